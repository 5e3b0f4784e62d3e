"""Calibration of the likelihood ownership test on controls: models that never saw the key, each tested against
cards of keys it never saw. Their p-values must be uniform (the exact rank p-value is discrete: at most uniform, i.e.
P(p <= a) <= a), and none may fall at or below 1e-3.

The controls are listed in a YAML file (benchmarks/calibration_smollm2.yaml: the base, LoRA and full fine-tunes of it
on other data and seeds, models fingerprinted with the same methods and other keys, merges and prunes of those) and
built into --out with meraser's own library calls (`run_attack`, `fingerprint`), each once. Cards are fresh keys
drawn on the base model with no training (Chain & Hash: a random secret; the others: seeds 1000+), saved in --out so
a rerun tests the same ones. Every (control, card) pair is one control test, appended to --out/p_values.jsonl as it
finishes: an interrupted run resumes where it stopped. Prints the false-positive count at 1e-3 and 1e-6, the smallest
p-value and Kolmogorov-Smirnov tests against uniform per method and rule; writes a QQ figure and a Markdown table.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/likelihood_calibration.py benchmarks/calibration_smollm2.yaml \\
        [--out runs/calibration] [--results benchmarks/results/likelihood_calibration] [--summarise-only]
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import time
from pathlib import Path

from controls import build_controls, group, read_config

TOP_KEYS = {"base", "cards", "card_config", "controls"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config", help="YAML: base, cards (per method), card_config, controls")
    ap.add_argument("--out", default="runs/calibration", help="controls, cards and p-values (resumable)")
    ap.add_argument("--results", default="benchmarks/results/likelihood_calibration",
                    help="where the table, figure and p-values are copied to be checked in")
    ap.add_argument("--summarise-only", action="store_true",
                    help="summarise the pairs tested so far (an interrupted run), testing nothing")
    args = ap.parse_args()
    if args.summarise_only:
        from meraser.utils import read_jsonl

        rows = read_jsonl(Path(args.out) / "p_values.jsonl")
        return _summarise(rows, Path(args.results), len({r["control"] for r in rows}), len({r["card"] for r in rows}))

    import transformers

    transformers.utils.logging.set_verbosity_error()
    cfg = read_config(args.config, TOP_KEYS)
    out = Path(args.out)
    models = build_controls(cfg["controls"], out / "controls")
    cards = _cards(cfg, out / "cards")
    rows = _test_pairs(models, cards, cfg["controls"], out / "p_values.jsonl")
    _summarise(rows, Path(args.results), len(models), len(cards))


def _cards(cfg: dict, folder: Path) -> list:
    from meraser.evaluation.likelihood import tokenizer_digest
    from meraser.fingerprints import get_method
    from meraser.fingerprints.card import Card

    base = tok = None
    cards = []
    for method, count in cfg["cards"].items():
        for i in range(count):
            path = folder / f"{method}-{1000 + i}.json"
            if not path.exists():
                if base is None:
                    from meraser.models import load_model

                    base, tok = load_model(cfg["base"])
                m = get_method(method)
                extra = {"secret_key": secrets.token_hex(16)} if method == "chain-hash" else {}
                over = {"seed": 1000 + i, **cfg.get("card_config", {}).get(method, {}), **extra}
                card = m.make_card(base, tok, m.Config.from_dict(over))
                card.extra["tokenizer"] = tokenizer_digest(tok)
                card.save(path)
            cards.append((path.stem, Card.load(path)))
    return cards


def _test_pairs(models: dict, cards: list, specs: dict, path: Path) -> list[dict]:
    from meraser.evaluation.likelihood import LikelihoodConfig, likelihood_test
    from meraser.models import load_model
    from meraser.utils import append_jsonl, read_jsonl

    rows = read_jsonl(path) if path.exists() else []
    done = {(r["control"], r["card"]) for r in rows}
    for name, spec in models.items():
        todo = [(cid, c) for cid, c in cards if (name, cid) not in done]
        if not todo:
            continue
        model, tok = load_model(spec)
        for cid, card in todo:
            t0 = time.perf_counter()
            r = likelihood_test(model, tok, card, LikelihoodConfig(), progress=True)
            row = {"control": name, "group": group(specs[name]), "card": cid, "method": card.method,
                   "p_value": r["p_value"], "rule": r["rule"], "p_exact": r["p_exact"],
                   "p_normal_tail": r["p_normal_tail"], "owned": r["owned"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            append_jsonl(path, row)
            rows.append(row)
            print(f"{name:28s} {cid:22s} p {row['p_value']:.3g} ({row['rule']}) {row['seconds']} s", flush=True)
        del model
    return rows


def _summarise(rows: list[dict], results: Path, n_models: int, n_cards: int) -> None:
    from rich.table import Table
    from scipy import stats

    from meraser.evaluation.ownership import p_text
    from meraser.utils import atomic_write_text, console, write_jsonl

    seconds = sum(r["seconds"] for r in rows)
    title = (f"likelihood test on {len(rows)} control-card pairs ({n_models} models x {n_cards} cards); "
             f"{seconds / 60:.0f} min of tests on {platform.machine()}")
    cols = ("controls", "pairs", "p <= 1e-3", "p <= 1e-6", "smallest p", "KS greater: D (p)", "KS two-sided: D (p)")
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="right")
    lines = [f"{title}\n", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    groups = [("method " + m, lambda r, m=m: r["method"] == m) for m in sorted({r["method"] for r in rows})]
    groups += [("rule " + u, lambda r, u=u: r["rule"] == u) for u in sorted({r["rule"] for r in rows})]
    groups += [(g, lambda r, g=g: r["group"] == g) for g in sorted({r["group"] for r in rows})]
    for label, keep in [*groups, ("all", lambda r: True)]:
        ps = [r["p_value"] for r in rows if keep(r)]
        # H1 of "greater": the p-values pile up low (too many ownership claims); two-sided: any departure
        g, two = stats.kstest(ps, "uniform", alternative="greater"), stats.kstest(ps, "uniform")
        cells = [label, str(len(ps)), str(sum(p <= 1e-3 for p in ps)), str(sum(p <= 1e-6 for p in ps)),
                 p_text(min(ps)), f"{g.statistic:.3f} ({g.pvalue:.2g})", f"{two.statistic:.3f} ({two.pvalue:.2g})"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    console(160).print(table)
    results.mkdir(parents=True, exist_ok=True)
    write_jsonl(results / "p_values.jsonl", rows)
    atomic_write_text(results / "table.md", "\n".join(lines) + "\n")
    _qq(rows, results / "qq.png")
    print(json.dumps({"pairs": len(rows), "false_positives_at_1e-3": sum(r["p_value"] <= 1e-3 for r in rows)}))


def _qq(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, hx) = plt.subplots(1, 2, figsize=(9, 4.2))
    for method in sorted({r["method"] for r in rows}):
        ps = sorted(r["p_value"] for r in rows if r["method"] == method)
        expected = [(i + 1) / (len(ps) + 1) for i in range(len(ps))]
        ax.plot(expected, ps, "o", ms=3, label=f"{method} ({len(ps)})")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="uniform")
    ax.set(xlabel="expected p (uniform)", ylabel="observed p", title="control p-values against uniform")
    ax.legend(fontsize=7)
    hx.hist([r["p_value"] for r in rows], bins=20, range=(0, 1), color="#4c72b0", edgecolor="white")
    hx.axhline(len(rows) / 20, color="k", ls="--", lw=1)
    hx.set(xlabel="p-value", ylabel="control-card pairs", title=f"histogram ({len(rows)} pairs; dashed: uniform)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
