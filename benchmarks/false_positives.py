"""False positives of fingerprint cards on models that never saw them: each card verified (the paper's check: FSR,
or a watermark card's z-test) on every control model, one model loaded at a time. A control "claims" a card where the
verdict would call it owned: FSR above 0 for cards with target text, the pooled z-test at the card's level for a
watermark. The cards and controls are listed in YAML (benchmarks/false_positives_smollm2.yaml); controls are built
with meraser's own library calls (benchmarks/controls.py) into --out, each once, and every (control, card) result is
appended to --out/results.jsonl as it is measured, so an interrupted run resumes.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/false_positives.py benchmarks/false_positives_smollm2.yaml \\
        [--out runs/false_positives] [--results benchmarks/results/false_positives]

Who should claim what: for an invasive scheme (trained in: ImF, the watermark, MergePrint) every control is a true
negative. A non-invasive scheme (ProFLingo, RoFL) fingerprints the base model as it is, so every derivative of it
(a control of the base's family) should claim its card, and only controls of another family (`family:` in the YAML;
Gemma 3 270M here, the one other family this machine has) are negatives.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

from controls import build_controls, group, read_config

TOP_KEYS = {"cards", "controls"}
CARD_KEYS = {"card", "made_by"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML: cards (fingerprint folders or card files), controls")
    ap.add_argument("--out", default="runs/false_positives", help="controls and results (resumable)")
    ap.add_argument("--results", default="benchmarks/results/false_positives",
                    help="where the table and results are copied to be checked in")
    args = ap.parse_args()

    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = _read_config(args.config)
    out = Path(args.out)
    models = build_controls(cfg["controls"], out / "controls")
    cards = _cards(cfg["cards"])
    rows = _test_pairs(models, cards, cfg["controls"], out / "results.jsonl")
    _summarise(rows, cards, Path(args.results))


def _read_config(path: str) -> dict:
    from meraser.utils import unknown_name

    cfg = read_config(path, TOP_KEYS)
    for i, spec in enumerate(cfg["cards"]):
        for key in spec:
            if key not in CARD_KEYS:
                raise unknown_name("card key", key, CARD_KEYS, f"{path}: cards[{i}]")
    return cfg


def _cards(specs: list[dict]) -> list[dict]:
    """Each card with what its own fingerprinted model scored (the fingerprint folder's summary, where given)."""
    from meraser.fingerprints import get_method
    from meraser.fingerprints.card import Card
    from meraser.utils import MeraserError

    cards = []
    for spec in specs:
        path = Path(spec["card"])
        if not path.exists():
            raise MeraserError(f"card {path} does not exist; make it with: {spec.get('made_by', '?')}")
        card = Card.load(path)
        summary = path / "fingerprint_summary.json"
        owner = json.loads(summary.read_text()).get("fsr") if summary.exists() else None
        cards.append({"id": path.stem if path.is_file() else path.name, "card": card, "owner_fsr": owner,
                      "invasive": get_method(card.method).invasive})
    return cards


def _test_pairs(models: dict, cards: list[dict], specs: dict, path: Path) -> list[dict]:
    from meraser.evaluation.fsr import fsr
    from meraser.models import load_model
    from meraser.utils import append_jsonl, read_jsonl

    rows = read_jsonl(path) if path.exists() else []
    done = {(r["control"], r["card"]) for r in rows}
    for name, model_spec in models.items():
        todo = [c for c in cards if (name, c["id"]) not in done]
        if not todo:
            continue
        model, tok = load_model(model_spec)
        family = specs[name].get("family")
        for c in todo:
            t0, card = time.perf_counter(), c["card"]
            r = fsr(model, tok, card, false_positive_inputs=0)
            claimed = r["watermark"]["owned"] if card.match == "watermark" else r["fsr"] > 0
            # a non-invasive card is the base model's own: its family's models are derivatives, not negatives
            role = "derivative" if not c["invasive"] and family is None else "negative"
            row = {"control": name, "group": group(specs[name]), "family": family or "base's", "card": c["id"],
                   "method": card.method, "role": role, "fsr": r["fsr"], "claimed": bool(claimed),
                   **({"watermark_p": r["watermark"]["p_value"],
                       "fresh_key_p": _fresh_key_ps(card, [t["output"] for t in r["per_trigger"]], tok)}
                      if card.match == "watermark" else {}),
                   "seconds": round(time.perf_counter() - t0, 1)}
            append_jsonl(path, row)
            rows.append(row)
            verdict = f"p {row['watermark_p']:.2g}" if "watermark_p" in row else f"FSR {row['fsr']:.0%}"
            print(f"{name:24s} {c['id']:40s} {verdict:10s} {'claimed' if claimed else '-'} ({role}) "
                  f"{row['seconds']} s", flush=True)
        del model
    return rows


def _summarise(rows: list[dict], cards: list[dict], results: Path) -> None:
    from rich.table import Table

    from meraser.utils import atomic_write_text, console, write_jsonl

    controls = list(dict.fromkeys(r["control"] for r in rows))
    seconds = sum(r["seconds"] for r in rows)
    title = (f"fingerprint cards on {len(controls)} models that never saw them; {seconds / 60:.0f} min of checks on "
             f"{platform.machine()}")
    cols = ("scheme", "card", "owner's FSR", "negatives claiming (false positives)", "derivatives claiming")
    table, lines = Table(title=title), [f"{title}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for col in cols:
        table.add_column(col)
    for c in cards:
        mine = [r for r in rows if r["card"] == c["id"]]
        neg, der = ([r for r in mine if r["role"] == role] for role in ("negative", "derivative"))
        claimed = [r["control"] for r in neg if r["claimed"]]
        cells = [c["card"].method, c["id"], "-" if c["owner_fsr"] is None else f"{c['owner_fsr']:.0%}",
                 f"{len(claimed)} of {len(neg)}" + (f" ({', '.join(claimed)})" if claimed else ""),
                 f"{sum(r['claimed'] for r in der)} of {len(der)}" if der else "-"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    grid = ["", "| control | group | " + " | ".join(c["card"].method for c in cards) + " |",
            "|" + "---|" * (len(cards) + 2)]
    for name in controls:
        by_card = {r["card"]: r for r in rows if r["control"] == name}
        cells = [f"p {r['watermark_p']:.2g}" if "watermark_p" in r else f"{r['fsr']:.0%}"
                 for r in (by_card[c["id"]] for c in cards)]
        first = by_card[cards[0]["id"]]
        kind = first["group"] + ("" if first["family"] == "base's" else f" ({first['family']})")
        grid.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    console(log_width=200).print(table)
    lines += _uniformity(rows, cards)
    results.mkdir(parents=True, exist_ok=True)
    write_jsonl(results / "results.jsonl", rows)
    atomic_write_text(results / "table.md", "\n".join(lines + grid) + "\n")
    print("\n".join(grid))


FRESH_KEYS = 20  # watermark keys drawn per control to check the z-test's calibration on its answers


def _fresh_key_ps(card, answers: list[str], tokenizer) -> list[float]:
    """The z-test's p-values on a control's answers under keys drawn like the card's: under a key the model never
    saw they are uniform, whatever the text (the card's own key alone gives one p-value per control, and siblings'
    answers to the same prompts are alike, so those are correlated: no uniformity test)."""
    import random

    from meraser.fingerprints.semcond_watermark import draw_keys, secret_int, z_test

    key = secret_int(card.secret_key)
    keys = draw_keys(random.Random(card.seed + 1), FRESH_KEYS, exclude=key)
    return [z_test(answers, tokenizer, k, card.extra["gamma"])["p_value"] for k in keys]


def _uniformity(rows: list[dict], cards: list[dict]) -> list[str]:
    """A watermark card's z-test p-values on its negatives: the card's key (one per control, correlated) and fresh
    keys (FRESH_KEYS per control), KS against uniform, one-sided (too many small p-values) and two-sided."""
    from scipy import stats

    out = []
    for c in cards:
        neg = [r for r in rows if r["card"] == c["id"] and r["role"] == "negative" and "watermark_p" in r]
        if not neg:
            continue
        own = [r["watermark_p"] for r in neg]
        fresh = [p for r in neg for p in r.get("fresh_key_p", [])]
        line = (f"{c['id']}: the card's key on {len(own)} negatives, z-test p from {min(own):.2g} to {max(own):.2g}")
        if fresh:
            g, two = stats.kstest(fresh, "uniform", alternative="greater"), stats.kstest(fresh, "uniform")
            line += (f"; {len(fresh)} fresh keys on the same answers: {sum(p <= 1e-3 for p in fresh)} at p <= 1e-3, "
                     f"smallest {min(fresh):.2g}, KS against uniform one-sided D {g.statistic:.3f} (p {g.pvalue:.2g}), "
                     f"two-sided D {two.statistic:.3f} (p {two.pvalue:.2g})")
        print(line)
        out.append("\n" + line)
    return out


if __name__ == "__main__":
    main()
