"""The paper's Table 2 (incremental fine-tuning, LLM-Pruner pruning) and the merging half of its Table 3 on
SmolLM2-135M, for each fingerprint, with MEraser's row from the same run.

For each fingerprint (if-sft, utf, chain-hash: fingerprinted once with the method's defaults) every attack is
applied in memory through the attack registry (`meraser.attacks`, what `meraser attack` runs) with the paper's
settings, and the attacked model is evaluated:
- FSR and false-positive rate on the card, perplexity on held-out SQuAD paragraphs (../shared/data/text),
- ordinary-question accuracy (Algorithm 1's utility check: 12 questions) and Algorithm 1's verdict (FSR 0 and at
  least 80% of the fingerprinted model's ordinary accuracy),
- the attack's wall time (model load and evaluation excluded).

Attacks (labels in the table): finetune (300 chitchat rows, LoRA, the training defaults); prune-l1 / prune-l2 at 5%,
prune-random / prune-taylor at 20% (layers 3-28 of 30); merge-task-arithmetic and merge-dare at weights 4:6, 5:5,
6:4 (fingerprinted : expert; the expert is the base fine-tuned on 600 chitchat rows, made once and shared); meraser
(erase then recover with the paper preset, the `meraser run` defaults). `--attacks` picks a subset.

    .venv/bin/python benchmarks/table2.py [--methods if-sft utf chain-hash] [--attacks ...] [--out runs/table2]

Every cell is written to OUT/<fingerprint>/<attack>.json as soon as it is done; re-running skips finished cells.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"

WEIGHTS = {"4:6": [0.4, 0.6], "5:5": [0.5, 0.5], "6:4": [0.6, 0.4]}


def attacks() -> dict[str, tuple[str, dict]]:
    """label -> (registered attack, settings): the paper's settings, in the order they are run (cheap first). The
    merges make their expert (the base fine-tuned on 600 chitchat rows) in OUT/merge-work once and share it."""
    table = {"prune-l1": ("prune-l1", {"ratio": 0.05}), "prune-l2": ("prune-l2", {"ratio": 0.05}),
             "prune-random": ("prune-random", {"ratio": 0.2}), "prune-taylor": ("prune-taylor", {"ratio": 0.2})}
    for method in ("merge-task-arithmetic", "merge-dare"):
        for label, w in WEIGHTS.items():
            table[f"{method} {label}"] = (method, {"weights": w})
    table["finetune"] = ("finetune", {})
    table["meraser"] = ("meraser", {})
    return table


def fingerprint(method: str, model: str, out: Path, evalcfg, console) -> dict:
    """Fingerprint once (the method's defaults) and evaluate; cached in OUT/<method>/fingerprinted.json."""
    from meraser.evaluation.algorithm1 import ordinary_accuracy
    from meraser.evaluation.evaluate import evaluate_model
    from meraser.fingerprints.embed import embed
    from meraser.models import load_model

    record = out / method / "fingerprinted.json"
    if record.exists():
        return json.loads(record.read_text())
    m, tok = load_model(model)
    t = time.perf_counter()
    fp, card, _ = embed(method, m, tok, None, out / method / "fingerprinted", overwrite=True, progress=True)
    seconds = round(time.perf_counter() - t, 1)
    row = {**_scores(evaluate_model(fp, tok, evalcfg, card), ordinary_accuracy(fp, tok)), "seconds": seconds}
    record.write_text(json.dumps(row, indent=2))
    console.print(f"{method}: fingerprinted in {seconds:.0f} s: {row}")
    return row


def _scores(res: dict, ordinary: float) -> dict:
    return {"fsr": res["fsr"], "false_positive_rate": res["false_positive_rate"], "ppl": res["ppl"]["ppl"],
            "ordinary": ordinary}


def attack_cell(method: str, label: str, attack_name: str, settings: dict, args, evalcfg, reference: dict) -> dict:
    """Apply one attack to a fresh copy of the fingerprinted model and evaluate it."""
    from meraser.attacks import get_attack
    from meraser.attacks.base import AttackContext, apply_attack
    from meraser.evaluation.algorithm1 import RATIO, ordinary_accuracy
    from meraser.evaluation.evaluate import evaluate_model
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import CARD_FILE
    from meraser.models import load_model

    folder = args.out / method / "fingerprinted"
    attack = get_attack(attack_name)
    cfg = attack.Config.from_dict(settings, where=label)
    work = args.out / ("merge-work" if attack_name.startswith("merge") else f"{method}/work-{attack_name}")
    ctx = AttackContext(str(folder / "model"), args.model, work, progress=True)
    attack.check(cfg, ctx)
    m, tok = load_model(str(folder / "model"))
    t = time.perf_counter()
    m = apply_attack(attack, m, tok, cfg, ctx)
    seconds = round(time.perf_counter() - t, 1)
    row = _scores(evaluate_model(m, tok, evalcfg, Card.load(folder / CARD_FILE)), ordinary_accuracy(m, tok))
    row["erased"] = row["fsr"] == 0 and row["ordinary"] >= RATIO * reference["ordinary"]
    return {**row, "seconds": seconds, "info": ctx.info, "settings": cfg.to_dict()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["if-sft", "utf", "chain-hash"])
    ap.add_argument("--attacks", nargs="+", help="labels to run (default: all, in table order)")
    ap.add_argument("--out", type=Path, default=Path("runs/table2"))
    ap.add_argument("--windows", type=int, default=50, help="512-token PPL windows of held-out SQuAD text")
    ap.add_argument("--tables-only", action="store_true", help="print the tables of the finished cells, run nothing")
    args = ap.parse_args()

    import transformers

    from meraser.evaluation.evaluate import EvalConfig
    from meraser.utils import console as log_console

    transformers.utils.logging.set_verbosity_error()
    console = log_console(220)
    evalcfg = EvalConfig(ppl=str(SHARED / "text/squaddev_v1.1.json"), ppl_windows=args.windows,
                         false_positive_inputs=32)
    table = attacks()
    labels = args.attacks or list(table)
    unknown = [a for a in labels if a not in table]
    if unknown:
        raise SystemExit(f"unknown attack labels {unknown}; choose from {list(table)}")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for method in args.methods:
        if args.tables_only and not (args.out / method / "fingerprinted.json").exists():
            continue
        reference = fingerprint(method, args.model, args.out, evalcfg, console)
        results[method] = {"fingerprinted": reference}
        for label in labels:
            record = args.out / method / f"{label.replace(' ', '_').replace(':', '-')}.json"
            if args.tables_only and not record.exists():
                continue
            if not record.exists():
                row = attack_cell(method, label, *table[label], args, evalcfg, reference)
                record.write_text(json.dumps(row, indent=2))
                console.print(f"{method} / {label}: {json.dumps({k: v for k, v in row.items() if k != 'settings'})}")
            results[method][label] = json.loads(record.read_text())
    print_table(results, args, console)
    (args.out / "table2.json").write_text(json.dumps(results, indent=2))


def print_table(results: dict, args, console) -> None:
    from rich.table import Table

    table = Table(title=f"Attacks on {args.model}: FSR / false positives / SQuAD PPL ({args.windows}x512) / "
                        f"ordinary answers / Algorithm 1 / attack time")
    for h in ["fingerprint", "attack", "FSR", "FP", "PPL", "ordinary", "Alg. 1 erased", "time"]:
        table.add_column(h, justify="right")
    for method, rows in results.items():
        for label, r in rows.items():
            table.add_row(method, label, f"{r['fsr']:.0%}", f"{r['false_positive_rate']:.0%}", f"{r['ppl']:.2f}",
                          f"{round(r['ordinary'] * 12)}/12", str(r.get("erased", "-")), f"{r['seconds']:.0f} s")
    console.print(table)
    lines = ["| fingerprint | attack | FSR | false positives | SQuAD PPL | ordinary answers | Algorithm 1 | attack time |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rows in results.items():
        for label, r in rows.items():
            lines.append(f"| {method} | {label} | {r['fsr']:.0%} | {r['false_positive_rate']:.0%} | {r['ppl']:.2f} | "
                         f"{round(r['ordinary'] * 12)}/12 | {_verdict(r)} | {r['seconds']:.0f} s |")
    (args.out / "table2.md").write_text("\n".join(lines) + "\n")
    console.print(f"markdown: {args.out / 'table2.md'}")


def _verdict(r: dict) -> str:
    return "-" if "erased" not in r else ("erased" if r["erased"] else "not erased")


if __name__ == "__main__":
    main()
