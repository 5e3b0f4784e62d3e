"""How the perplexity filter (`meraser attack --method perplexity-filter`) sees prompts: the helper's perplexity of
the ordinary questions (what the filter must let through), of benign chitchat prompts (what `benign_refusal`
calibrates on) and of each card's triggers (what it should refuse), each scored as the filter scores a prompt, and
the thresholds `benign_refusal` gives at a few shares.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/prompt_perplexity.py --helper smollm2-135m \
        runs/smollm2-135m/fingerprints/*/fingerprint_card.json

It reads only the helper and the cards (no fingerprinted model): seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from meraser.attacks.perplexity_filter import (PerplexityFilterConfig, benign_prompts, filter_texts, prompt_perplexities,
                                               threshold_at)
from meraser.evaluation.ordinary_questions import ORDINARY_QA
from meraser.models import load_model

SHARES = (0.01, 0.05, 0.10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cards", nargs="*", help="fingerprint cards whose triggers to score")
    ap.add_argument("--helper", default="smollm2-135m", help="the helper model (the filter's default: the base)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()

    model, tok = load_model(args.helper)
    benign = "chitchat (the calibration's source)"
    groups = {"ordinary questions (must pass)": filter_texts(tok, [q for q, _ in ORDINARY_QA]),
              benign: filter_texts(tok, benign_prompts(PerplexityFilterConfig()))}
    for path in args.cards:
        card = json.loads(Path(path).read_text())
        groups[f"{card['method']} triggers ({Path(path).parent.name})"] = filter_texts(
            tok, card["triggers"], card.get("system_prompt"))
    table = Table(title=f"prompt perplexity under {args.helper}")
    for h in ("prompts", "n", "min", "median", "max"):
        table.add_column(h)
    figures, scores = {}, {}
    for name, texts in groups.items():
        ppl = scores[name] = sorted(prompt_perplexities(model, tok, texts))
        figures[name] = {"n": len(ppl), "min": ppl[0], "median": ppl[len(ppl) // 2], "max": ppl[-1]}
        table.add_row(name, str(len(ppl)), *(f"{figures[name][k]:.0f}" for k in ("min", "median", "max")))
    console = Console()
    console.print(table)
    thresholds = {share: threshold_at(scores[benign], share) for share in SHARES}  # what benign_refusal sets
    console.print("benign_refusal thresholds: " + ", ".join(f"{s:.0%} -> {t:.0f}" for s, t in thresholds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"helper": args.helper, "groups": figures,
                                               "thresholds": thresholds}, indent=1))


if __name__ == "__main__":
    main()
