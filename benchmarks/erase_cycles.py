"""Erase-recover cycles (issue "erasure that holds"): does a second or third MEraser pass take the strict checks
further than one? Each cycle erases the previous cycle's model on a fresh mismatched set (seed = cycle) and
recovers it on the paper's recovery data (chitchat rows, disjoint from that erase's rows), with the `paper` presets;
nothing reads the card until the evaluation after each recovery (paper FSR, the strict checks against the base
model, perplexity).

    .venv/bin/python benchmarks/erase_cycles.py START CARD --out runs/cycles-if-sft [--cycles 2] [--base smollm2-135m]

START is the model the first cycle erases: a fingerprinted model, or the recovered model of a bench cell to go on
from it (its recovery is then cycle 0, already measured). Resumes: a cycle whose folders are finished is reused.
Results are written to OUT/cycles.json and printed as a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PPL_TEXT = "../shared/data/text/squaddev_v1.1.json"


def _stage(fn, model: str, out: Path, **kw) -> str:
    """Run one erase or recover into `out` (adapter only, on top of `model`) unless it already finished there."""
    if not (out / "adapter_model.safetensors").exists():
        fn(model, out, adapter=True, overwrite=out.exists(), **kw)
    return str(out)


def main() -> None:
    from meraser.erase.datasets import CleanSet, MismatchedSet
    from meraser.erase.meraser import erase_model, recover_model
    from meraser.evaluation.evaluate import EvalConfig, evaluate_model
    from meraser.evaluation.strict import strict_check
    from meraser.fingerprints.card import Card
    from meraser.models import load_model
    from meraser.utils import atomic_write_text

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("start")
    ap.add_argument("card")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cycles", type=int, default=2)
    ap.add_argument("--base", default="smollm2-135m")
    ap.add_argument("--ppl", default=PPL_TEXT)
    args = ap.parse_args()

    card, out = Card.load(args.card), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = EvalConfig(ppl=args.ppl, ppl_windows=50, false_positive_inputs=32)
    base, tok = load_model(args.base)
    base_strict = strict_check(base, tok, card)
    del base
    rows, model = [], args.start
    for k in range(1, args.cycles + 1):
        erased = _stage(erase_model, model, out / f"erase{k}", data=MismatchedSet(seed=k))
        model = _stage(recover_model, erased, out / f"recover{k}", data=CleanSet(magpie=0.0, seed=k))
        m, tok = load_model(model)
        ev = evaluate_model(m, tok, cfg, card, strict_base=base_strict)
        s = ev["strict"]
        rows.append({"cycle": k, "model": model, "paper_fsr": ev["fsr"], "forced": s["forced"],
                     "paraphrased": s["paraphrased"], "sampled": s["sampled"], "partial": s["partial"],
                     "loglik": s["loglik"], "ppl": ev["ppl"]["ppl"], "erased_strict": s["erased_strict"],
                     "above_base": [c for c, ok in s["at_base_level"].items() if not ok]})
        atomic_write_text(out / "cycles.json", json.dumps({"start": args.start, "card": args.card,
                                                           "base_loglik": base_strict["loglik"], "cycles": rows},
                                                          indent=1))
        print(json.dumps(rows[-1]), flush=True)
    print(f"base: target loglik {base_strict['loglik']:.2f}")
    print("| cycle | paper FSR | forced | paraphrased / sampled / partial | target loglik | PPL | strict |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cycle']} | {r['paper_fsr']:.0%} | {r['forced']:.0%} | {r['paraphrased']:.0%} / "
              f"{r['sampled']:.0%} / {r['partial']:.0%} | {r['loglik']:.2f} | {r['ppl']:.2f} | "
              f"{'erased' if r['erased_strict'] else 'not erased (' + ', '.join(r['above_base']) + ')'} |")


if __name__ == "__main__":
    main()
