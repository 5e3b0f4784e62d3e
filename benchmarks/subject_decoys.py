"""Why one-subject subject-sentence cannot be proven owned: on a model fingerprinted with it, the score (mean
log-probability per token of the sentence after the card's questions) of the real subject and of every decoy subject,
grouped by what a decoy shares with the real subject (its name, its kind, neither). The likelihood test ranks the
card as one unit among these decoys, so it is only as strong as the real subject stands out from them.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/subject_decoys.py runs/smollm2-135m/fingerprints/<subject-sentence>
"""

from __future__ import annotations

import argparse
import statistics


def unit_scores(folder: str) -> tuple[str, list[str], list[float]]:
    """The card's subject, its decoy subjects, and the unit scores: the real subject's first, then each decoy's (the
    mean over the card's questions, as the likelihood test ranks them)."""
    from meraser.evaluation.likelihood import LikelihoodConfig, keys_and_decoys, pair_scores
    from meraser.fingerprints.card import Card
    from meraser.models import load_model

    card = Card.load(f"{folder}/fingerprint_card.json")
    model, tok = load_model(f"{folder}/model")
    keys = keys_and_decoys(card, LikelihoodConfig(decoys=95))
    pairs = [p for real, decoys in keys for p in (real, *decoys)]
    prefills = [card.trigger_prefills[i] for i, (_, d) in enumerate(keys) for _ in range(1 + len(d))]
    scores = pair_scores(model, tok, card, pairs, prefills, progress=True)
    n, subject = len(keys[0][1]), card.extra["subject"]
    units = [statistics.mean(scores[k * (n + 1) + j] for k in range(len(keys))) for j in range(n + 1)]
    head, tail = keys[0][0][0].split(subject)
    others = [q[len(head):len(q) - len(tail)] for q, _ in keys[0][1]]
    return subject, others, units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="a subject-sentence fingerprint folder (model/ and fingerprint_card.json)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    subject, others, units = unit_scores(args.folder)
    name, kind = subject.removeprefix("the ").rsplit(" ", 1)
    groups: dict[str, list[float]] = {"shares the name": [], "shares the kind": [], "shares neither": []}
    for other, score in zip(others, units[1:]):
        o_name, o_kind = other.removeprefix("the ").rsplit(" ", 1)
        groups["shares the name" if o_name == name else "shares the kind" if o_kind == kind else "shares neither"
               ].append(score)
    table = Table(title=f"{args.folder}: the real subject ({subject}) scores {units[0]:.3f}")
    for col in ("decoy subjects", "n", "mean", "max", "min", "real's z against them"):
        table.add_column(col)
    for label, v in [("all", units[1:]), *groups.items()]:
        z = (units[0] - statistics.mean(v)) / statistics.stdev(v)
        table.add_row(label, str(len(v)), f"{statistics.mean(v):.3f}", f"{max(v):.3f}", f"{min(v):.3f}", f"{z:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
