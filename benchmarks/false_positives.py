"""False positives of fingerprint cards on models that never saw them: each card verified (the paper's check: FSR,
or a watermark card's z-test) on every model given, one model loaded at a time. A model "claims" a card where its
verdict would call it owned: FSR above 0 for cards with target text, the pooled z-test at the card's level for a
watermark. Prints card x model, and per card how many of the models claimed it.

    .venv/bin/python benchmarks/false_positives.py --cards runs/smollm2-135m/fingerprints/*imf* ... \\
        --models smollm2-135m runs/calibration_cards/lora-chitchat-s1 ... gemma3-270m [--json out.json]

For an invasive scheme (trained in: ImF, the watermark, MergePrint) the base and its siblings are true negatives;
for a non-invasive one (ProFLingo, RoFL: the base model itself is the fingerprinted one) every derivative of the
base should claim it, and only models of other families (Gemma 3 270M here) are negatives.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cards", nargs="+", required=True, help="fingerprint folders or card files")
    ap.add_argument("--models", nargs="+", required=True, help="model ids, aliases or folders")
    ap.add_argument("--json", help="also write every result here")
    args = ap.parse_args()

    from rich.table import Table

    from meraser.evaluation.fsr import fsr
    from meraser.fingerprints.card import Card
    from meraser.models import load_model
    from meraser.utils import console

    cards = [(c, Card.load(c)) for c in args.cards]
    results = []
    for spec in args.models:
        t0 = time.perf_counter()
        model, tok = load_model(spec)
        for path, card in cards:
            r = fsr(model, tok, card, false_positive_inputs=0)
            claimed = r["watermark"]["owned"] if card.match == "watermark" else r["fsr"] > 0
            results.append({"model": spec, "card": str(path), "method": card.method, "fsr": r["fsr"],
                            "claimed": bool(claimed), **({"watermark_p": r["watermark"]["p_value"]}
                                                         if card.match == "watermark" else {})})
        print(f"{spec}: {len(cards)} cards in {time.perf_counter() - t0:.0f} s", flush=True)
        del model
    t = Table(title="fingerprint cards on models that never saw them: FSR (watermark: z-test p)")
    t.add_column("model")
    for _, card in cards:
        t.add_column(card.method)
    for spec in args.models:
        row = [r for r in results if r["model"] == spec]
        t.add_row(spec, *(f"p {r['watermark_p']:.2g}" if "watermark_p" in r else f"{r['fsr']:.0%}" for r in row))
    console(log_width=200).print(t)
    for _, card in cards:
        n = sum(r["claimed"] for r in results if r["method"] == card.method)
        print(f"{card.method}: claimed by {n} of {len(args.models)} models")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
