"""Is the real key special among its decoys on a model that never saw it? Per key, the rank of every scored pair
(the real one and each decoy in turn playing the real one) among the key's pairs, averaged over the cards' keys.
Under the null the real key is one more draw from the generator: its mean rank is like any decoy's. Also the
targets' token counts (a score is a mean per token, so a length difference would tilt it).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/likelihood_ranks.py runs/calibration_many_cards/cards/if-sft-*.json \\
        [--model smollm2-135m] [--limit 20]
"""

from __future__ import annotations

import argparse
import statistics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cards", nargs="+", help="card files")
    ap.add_argument("--model", default="smollm2-135m", help="a model that never saw the cards' keys")
    ap.add_argument("--limit", type=int, help="use the first LIMIT cards (sorted by name)")
    args = ap.parse_args()

    from rich.progress import track

    from meraser.evaluation.likelihood import LikelihoodConfig, keys_and_decoys, pair_scores
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    model, tok = load_model(args.model)
    paths = sorted(args.cards)[:args.limit]
    ranks: dict[int, list[int]] = {}
    tokens: dict[str, list[int]] = {"real": [], "decoy": []}
    for path in track(paths, description="scoring each card's keys and decoys", transient=True):
        card = Card.load(path)
        for i, (real, decoys) in enumerate(keys_and_decoys(card, LikelihoodConfig())):
            pairs = [real, *decoys]
            scores = pair_scores(model, tok, card, pairs, [card.trigger_prefills[i]] * len(pairs))
            for j, s in enumerate(scores):
                ranks.setdefault(j, []).append(sum(x > s for x in scores))
            counts = [len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in pairs]
            tokens["real"].append(counts[0])
            tokens["decoy"] += counts[1:]
    keys, k = len(ranks[0]), len(ranks) - 1
    sd = ((k + 1) ** 2 - 1) ** 0.5 / 12 ** 0.5 / keys ** 0.5  # a uniform rank's sd, over `keys` keys
    decoy_means = [statistics.mean(ranks[j]) for j in range(1, k + 1)]
    real = statistics.mean(ranks[0])
    print(f"{len(paths)} cards, {keys} keys, {k} decoys a key, on {args.model}")
    print(f"real key: mean rank {real:.2f} (uniform: {k / 2:.1f}, sd of a mean {sd:.2f}: z {(real - k / 2) / sd:.2f})")
    print(f"each decoy as the real one: mean rank {min(decoy_means):.2f} to {max(decoy_means):.2f} "
          f"(their mean {statistics.mean(decoy_means):.2f})")
    print(f"target tokens: real {statistics.mean(tokens['real']):.2f}, decoys {statistics.mean(tokens['decoy']):.2f}")


if __name__ == "__main__":
    main()
