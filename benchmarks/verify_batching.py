"""Batched fingerprint verification vs one trigger at a time, measured in one run (goal: >= 4x).

Both paths are `meraser.evaluation.fsr.fsr` on the same model and card: batched (left padding, one `generate` per
batch of up to 16 triggers) and batch_size=1 (one `generate` per trigger). Without --card, each method's card is
built for the model with --triggers fingerprints (16; UTF's own default is one pair, which leaves nothing to
batch). No training is needed: decoding cost does not depend on whether the model was fingerprinted, and both
paths decode the same prompts with the same max_new_tokens. "same outputs" counts triggers whose greedy text is
identical both ways: under bf16 autocast a padded batch rounds differently from a single row, so where two tokens
are nearly tied (an untrained trigger on a model that was never fingerprinted) the greedy paths can part;
MERASER_PRECISION=fp32 runs both in fp32.

    .venv/bin/python benchmarks/verify_batching.py [--model smollm2-135m] [--card runs/x/fingerprint_card.json]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--card", help="a fingerprint card (default: one per method, made for --model)")
    ap.add_argument("--triggers", type=int, default=16, help="fingerprints per generated card")
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats of each path (best is kept)")
    args = ap.parse_args()

    import transformers
    from meraser.utils import console as log_console
    from rich.table import Table

    from meraser.evaluation.fsr import fsr
    from meraser.fingerprints import REGISTRY, get_method
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    transformers.utils.logging.set_verbosity_error()
    model, tok = load_model(args.model)
    if args.card:
        cards = {"card": Card.load(args.card)}
    else:
        cards = {name: get_method(name).make_card(model, tok, get_method(name).Config(num_fingerprints=args.triggers))
                 for name in REGISTRY}

    def timed(card, batch_size):
        best, res = float("inf"), None
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = fsr(model, tok, card, batch_size=batch_size, false_positive_inputs=0)
            best = min(best, time.perf_counter() - t)
        return best, res

    table = Table(title=f"verification of a card on {args.model}: batched vs one trigger at a time")
    for h in ["card", "triggers", "batched s", "one-at-a-time s", "speed-up", "same outputs", "FSR batched / one"]:
        table.add_column(h, justify="right")
    total_b = total_s = 0.0
    fsr(model, tok, next(iter(cards.values())), batch_size=16, false_positive_inputs=0)  # warm-up
    for name, card in cards.items():
        tb, rb = timed(card, 16)
        ts, rs = timed(card, 1)
        same = sum(a["output"] == b["output"] for a, b in zip(rb["per_trigger"], rs["per_trigger"]))
        table.add_row(name, str(len(card.triggers)), f"{tb:.2f}", f"{ts:.2f}", f"{ts / tb:.1f}x",
                      f"{same}/{len(card.triggers)}", f"{rb['fsr']:.0%} / {rs['fsr']:.0%}")
        total_b, total_s = total_b + tb, total_s + ts
    log_console(160).print(table)
    print(f"overall speed-up of batched verification: {total_s / total_b:.1f}x (goal >= 4x)")


if __name__ == "__main__":
    main()
