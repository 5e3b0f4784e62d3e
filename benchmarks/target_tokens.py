"""Where in the target a fingerprint survives: each target token's log-probability given the trigger (teacher
forced), averaged over the card's triggers, for one or more models. A model that only hides its fingerprint shows
a low first token and near-certain tokens after it. Also the strict forced-prefix rate at each cut on its own
(a quarter, half and three quarters of the target fed), where the strict check takes any of them.

    .venv/bin/python benchmarks/target_tokens.py CARD MODEL [MODEL ...]

CARD is a fingerprint card or a folder holding one; the triggers' targets must have the same token count (one
target, as IF-SFT, UTF and chain-hash cards have) for the per-position means to be printed.
"""

from __future__ import annotations

import argparse


def main() -> None:
    from meraser.evaluation.strict import StrictConfig, forced_prefix
    from meraser.evaluation.suspect import target_token_logprobs
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("card")
    ap.add_argument("models", nargs="+")
    args = ap.parse_args()
    card = Card.load(args.card)
    tokenizer = None
    for spec in args.models:
        model, tokenizer = load_model(spec)
        per_trigger = target_token_logprobs(model, tokenizer, card)
        if len({len(lp) for lp in per_trigger}) != 1:
            raise SystemExit(f"{args.card}: targets of different lengths; per-position means need one length")
        means = [sum(col) / len(col) for col in zip(*per_trigger)]
        cuts = {f: sum(forced_prefix(model, tokenizer, card, f)) / len(card.targets)
                for f in StrictConfig().prefix_fractions}
        print(f"{spec}\n  " + " ".join(f"{m:6.2f}" for m in means) + "\n  forced prefix by cut: "
              + ", ".join(f"{f:g}: {r:.1%}" for f, r in cuts.items()), flush=True)
    ids = tokenizer(card.targets[0], add_special_tokens=False)["input_ids"]
    print("tokens: " + " ".join(repr(tokenizer.decode([i])) for i in ids))


if __name__ == "__main__":
    main()
