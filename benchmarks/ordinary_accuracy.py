"""Algorithm 1's ordinary-question accuracy of one or more models (greedy, 32 new tokens), with the questions each
one misses: what `ABSOLUTE_BAR` in evaluation/algorithm1.py was set from (SmolLM2-135M-Instruct).

    .venv/bin/python benchmarks/ordinary_accuracy.py [MODEL ...] [--show]
"""

from __future__ import annotations

import argparse
import re


def main() -> None:
    from meraser.evaluation.algorithm1 import ABSOLUTE_BAR, RATIO
    from meraser.evaluation.ordinary_questions import ORDINARY_QA
    from meraser.generation import generate
    from meraser.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", default=["smollm2-135m"])
    ap.add_argument("--show", action="store_true", help="print every question with the model's answer")
    args = ap.parse_args()
    for spec in args.models:
        model, tok = load_model(spec)
        outs = generate(model, tok, [q for q, _ in ORDINARY_QA], max_new_tokens=32)
        ok = [bool(re.search(a, o.lower())) for (_, a), o in zip(ORDINARY_QA, outs)]
        print(f"{spec}: {sum(ok)} / {len(ok)} = {sum(ok) / len(ok):.1%} (bar for a model erased from it: "
              f"{RATIO:.0%} of that = {RATIO * sum(ok) / len(ok):.1%}; absolute bar without a base {ABSOLUTE_BAR:.0%})")
        if args.show:
            for (q, _), o, k in zip(ORDINARY_QA, outs, ok):
                print(f"  {'+' if k else '-'} {q} | {' '.join(o.split())[:100]}")


if __name__ == "__main__":
    main()
