"""The likelihood ownership test against `meraser verify --strict`, on the same model and card, measured in one run
(goal: at most 2x the strict checks' time).

For each method a card is made for --model (`make_card`, no training: the cost of either check does not depend on
whether the fingerprint was planted, only on the card's keys and targets). Both are timed on the same loaded model:
`strict_check` (paper FSR, forced prefix, paraphrases, samples, log-likelihood, partial match) and `likelihood_test`
(each key and its decoys scored by forward passes).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/likelihood_cost.py [--model smollm2-135m] [--methods chain-hash,if-sft]
"""

from __future__ import annotations

import argparse
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="chain-hash,if-sft,subject-sentence,utf",
                    help="comma-separated fingerprint methods")
    args = ap.parse_args()

    import os

    import torch
    import transformers
    from rich.table import Table

    from meraser.evaluation.likelihood import likelihood_test
    from meraser.evaluation.strict import strict_check
    from meraser.fingerprints import get_method
    from meraser.models import load_model
    from meraser.utils import console

    transformers.utils.logging.set_verbosity_error()
    model, tok = load_model(args.model)
    table = Table(title=f"likelihood test vs strict checks on {args.model} ({platform.machine()}, "
                        f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for col in ("method", "keys", "decoys / key", "strict (s)", "likelihood (s)", "likelihood / strict"):
        table.add_column(col, justify="right")
    total = [0.0, 0.0]
    for name in args.methods.split(","):
        method = get_method(name)
        card = method.make_card(model, tok, method.Config())
        t = time.perf_counter()
        strict_check(model, tok, card)
        strict_s = time.perf_counter() - t
        t = time.perf_counter()
        r = likelihood_test(model, tok, card)
        like_s = time.perf_counter() - t
        total[0] += strict_s
        total[1] += like_s
        table.add_row(name, str(r["keys"]), str(r["per_key"][0]["decoys"]), f"{strict_s:.1f}", f"{like_s:.1f}",
                      f"{like_s / strict_s:.2f}x")
    table.add_row("all", "", "", f"{total[0]:.1f}", f"{total[1]:.1f}", f"{total[1] / total[0]:.2f}x")
    console(120).print(table)


if __name__ == "__main__":
    main()
