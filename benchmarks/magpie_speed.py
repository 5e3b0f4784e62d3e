"""The Magpie step (the model writing and answering its own recovery questions): where its time goes, and what
answer batch size makes it cheapest, measured in one run.

Times `write_questions` and the greedy answers (`self_answers`) for --rows rows on --model, answering them at
each --answer-batches size. "same answers" counts answers identical to those of the first batch size: greedy
decoding of a padded batch under bf16 autocast can round differently from another batch's, so near-ties may part.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/magpie_speed.py [--model smollm2-135m] [--rows 64]
"""

from __future__ import annotations

import argparse
import platform
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--answer-batches", default="16,32,64", help="comma-separated answer batch sizes")
    args = ap.parse_args()

    import os

    import torch
    import transformers
    from rich.table import Table

    from meraser.erase.magpie import MAX_ANSWER_TOKENS, write_questions
    from meraser.models import load_model
    from meraser.utils import console

    transformers.utils.logging.set_verbosity_error()
    model, tok = load_model(args.model)
    t = time.perf_counter()
    questions = write_questions(model, tok, args.rows, seed=0)
    q_seconds = time.perf_counter() - t
    table = Table(title=f"Magpie: {args.rows} rows on {args.model} ({platform.machine()}, "
                        f"{torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    for col in ("step", "seconds", "s / row", "vs first", "same answers"):
        table.add_column(col, justify="right")
    table.add_row("write questions (batch 32)", f"{q_seconds:.1f}", f"{q_seconds / args.rows:.2f}", "", "")
    first = first_answers = None
    for b in [int(x) for x in args.answer_batches.split(",")]:
        t = time.perf_counter()
        answers = _answers(model, tok, questions, b, MAX_ANSWER_TOKENS)
        s = time.perf_counter() - t
        first = first or s
        first_answers = first_answers or answers
        same = sum(a == f for a, f in zip(answers, first_answers))
        table.add_row(f"answer (batch {b})", f"{s:.1f}", f"{s / args.rows:.2f}", f"{first / s:.2f}x",
                      f"{same}/{len(answers)}")
    console(120).print(table)


def _answers(model, tok, questions, batch_size, max_new_tokens):
    from meraser.generation import generate

    return generate(model, tok, questions, max_new_tokens=max_new_tokens, batch_size=batch_size)


if __name__ == "__main__":
    main()
