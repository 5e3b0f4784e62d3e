"""Full offline evaluation of a model: perplexity on 200 x 512-token windows of SQuAD paragraphs, and every local
BIG-bench task in ../shared/data/bigbench with limit 200, through lm-evaluation-harness. Prints the table and time.

    .venv/bin/python benchmarks/eval_offline.py [--model smollm2-135m] [--limit 200] [--windows 200]

Equivalent CLI: meraser evaluate --ppl ../shared/data/text/squaddev_v1.1.json -t ../shared/data/bigbench/<task> ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from rich.console import Console

    from meraser.evaluation.evaluate import EvalConfig, evaluate, results_table

    tasks = sorted(str(p.parent) for p in (SHARED / "bigbench").glob("*/task.json"))
    cfg = EvalConfig(ppl=str(SHARED / "text/squaddev_v1.1.json"), ppl_windows=args.windows, tasks=tasks,
                     limit=args.limit, batch_size=args.batch_size)
    t = time.perf_counter()
    res = evaluate(args.model, cfg, progress=True)
    elapsed = time.perf_counter() - t
    Console().print(results_table([res], title=f"{args.model}: offline evaluation"))
    print(f"perplexity {res['ppl']['ppl']:.3f} over {res['ppl']['tokens']} tokens in {res['ppl']['windows']} windows")
    print(f"total wall time {elapsed:.0f} s (model load included)")
    if args.json:
        args.json.write_text(json.dumps({**res, "wall_seconds": elapsed}, indent=2))


if __name__ == "__main__":
    main()
