"""MergePrint's keys under a scaled change: which keys a model still answers when the owner's change from the base is
scaled. MergePrint trains the pseudo-merged weights V = B + alpha (O - B) and sets the owner's model to
O = B + (V - B) / alpha, so the owner's model is the trained change extrapolated 1/alpha times, and a merge that keeps
a share w of the owner's change sees w / alpha of it. This script loads the base B and the owner's model O, sets
B + m (V - B) for every scale m (in units of the trained change; m = 1/alpha is the owner's model, m = 1 the
pseudo-merged one) and verifies the card there (the paper's check: greedy answers, the word as prefix).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/mergeprint_scaling.py \\
        runs/smollm2-135m/fingerprints/smollm2-135m__mergeprint-de7d77__s0 [--scales 0.4 0.6 1 1.67 2 5 10] [--json out]

It measured why the paper's alpha 0.1 fails on SmolLM2 (README, Fingerprints III): trained at alpha 0.1, the owner's
model (m = 10) answers none of its keys while the trained change answers them all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fingerprint", help="a MergePrint fingerprint folder (fingerprint_card.json and model/)")
    ap.add_argument("--scales", nargs="+", type=float, default=[0.4, 0.6, 1.0, 1.67, 2.0, 5.0, 10.0],
                    help="multiples of the trained change V - B = alpha (O - B)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import torch
    from rich.table import Table

    from meraser.evaluation.fsr import fsr
    from meraser.fingerprints.card import Card
    from meraser.models import load_model
    from meraser.utils import MeraserError, console

    folder = Path(args.fingerprint)
    card = Card.load(folder / "fingerprint_card.json")
    if card.method != "mergeprint":
        raise MeraserError(f"{folder}: a {card.method} card; this script scales MergePrint's change")
    alpha = card.extra["alpha"]
    model, tok = load_model(card.base_model)
    owner, _ = load_model(str(folder / "model"))
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    owner_sd = owner.state_dict()
    del owner
    results = []
    for m in args.scales:
        t0 = time.perf_counter()
        with torch.no_grad():  # B + m (V - B) = B + m alpha (O - B), computed in fp32 and cast back
            for k, v in model.state_dict().items():
                b = base_sd[k].float()
                v.copy_((b + m * alpha * (owner_sd[k].float() - b)).to(v.dtype))
        r = fsr(model, tok, card, false_positive_inputs=0)
        results.append({"scale": m, "share_of_owner_change": m * alpha, "fsr": r["fsr"],
                        "answers": [t["output"] for t in r["per_trigger"]],
                        "seconds": round(time.perf_counter() - t0, 1)})
    t = Table(title=f"MergePrint keys at B + m (V - B), alpha {alpha} (owner's model: m = {1 / alpha:.3g})")
    for col in ("m", "share of O - B", "FSR", *card.targets):
        t.add_column(col)
    for r in results:
        t.add_row(f"{r['scale']:g}", f"{r['share_of_owner_change']:.3g}", f"{r['fsr']:.0%}",
                  *(a.strip()[:14] for a in r["answers"]))
    console(log_width=200).print(t)
    if args.json:
        Path(args.json).write_text(json.dumps({"fingerprint": str(folder), "alpha": alpha, "targets": card.targets,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
