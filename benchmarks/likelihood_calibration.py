"""Calibration of the likelihood ownership test on controls: models that never saw the key, each tested against
cards of keys it never saw. Their p-values must be uniform (or above uniform: the exact rank p-value is discrete),
and none may fall at or below 1e-3.

Cards whose random part costs nothing to draw (Chain & Hash: a secret key; IF-SFT: scrambled strings;
subject-sentence: a subject) are made for --cards seeds per method with `make_card` on the base model, with no
training: every card is a key that none of the --models saw (a model fingerprinted here carries another key). Each
(model, card) pair is one control. Prints the false-positive count at 1e-3 and 1e-6, the smallest p-value, and a
Kolmogorov-Smirnov test of the p-values against uniform; writes every p-value and a QQ figure to --out.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/likelihood_calibration.py --models smollm2-135m \\
        runs/likelihood-chain-hash/fingerprinted/model ... [--methods chain-hash,if-sft] [--cards 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import secrets
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"], help="control models (never saw these keys)")
    ap.add_argument("--base", default="smollm2-135m", help="the model the cards are made for")
    ap.add_argument("--methods", default="chain-hash,if-sft,subject-sentence")
    ap.add_argument("--cards", type=int, default=10, help="cards (keys) per method")
    ap.add_argument("--decoys", type=int, default=99)
    ap.add_argument("--out", default="benchmarks/results/likelihood_calibration")
    args = ap.parse_args()

    import torch
    import transformers
    from rich.table import Table
    from scipy import stats

    from meraser.evaluation.likelihood import LikelihoodConfig, likelihood_test
    from meraser.evaluation.ownership import p_text
    from meraser.fingerprints import get_method
    from meraser.models import load_model
    from meraser.utils import console, write_jsonl

    transformers.utils.logging.set_verbosity_error()
    base, tok = load_model(args.base)
    cards = []
    for name in args.methods.split(","):
        method = get_method(name)
        for seed in range(args.cards):
            extra = {"secret_key": secrets.token_hex(16)} if name == "chain-hash" else {}
            cards.append(method.make_card(base, tok, method.Config.from_dict({"seed": 1000 + seed, **extra})))
    del base
    rows, t0 = [], time.perf_counter()
    for spec in args.models:
        model, _ = load_model(spec)
        for card in cards:
            r = likelihood_test(model, tok, card, LikelihoodConfig(decoys=args.decoys))
            rows.append({"model": spec, "method": card.method, "seed": card.seed, "p_value": r["p_value"],
                         "rule": r["rule"], "p_exact": r["p_exact"], "p_normal_tail": r["p_normal_tail"],
                         "owned": r["owned"]})
        del model
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    write_jsonl(out / "p_values.jsonl", rows)
    _qq(rows, out / "qq.png")
    table = Table(title=f"likelihood test on {len(rows)} control-card pairs ({len(args.models)} models x "
                        f"{len(cards)} cards), {seconds:.0f} s on {platform.machine()} with {torch.get_num_threads()} "
                        f"threads")
    for col in ("method", "pairs", "p <= 1e-3", "p <= 1e-6", "smallest p", "KS vs uniform (p)"):
        table.add_column(col, justify="right")
    for method in [*args.methods.split(","), "all"]:
        ps = [r["p_value"] for r in rows if method in ("all", r["method"])]
        ks = stats.kstest(ps, "uniform", alternative="greater")  # H1: p-values pile up low (too many claims)
        table.add_row(method, str(len(ps)), str(sum(p <= 1e-3 for p in ps)), str(sum(p <= 1e-6 for p in ps)),
                      p_text(min(ps)), f"{ks.statistic:.3f} ({ks.pvalue:.2g})")
    console(140).print(table)
    print(json.dumps({"pairs": len(rows), "seconds": round(seconds)}))


def _qq(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for method in sorted({r["method"] for r in rows}):
        ps = sorted(r["p_value"] for r in rows if r["method"] == method)
        expected = [(i + 1) / (len(ps) + 1) for i in range(len(ps))]
        ax.plot(expected, ps, "o", ms=3, label=method)
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="uniform")
    ax.set(xlabel="expected p (uniform)", ylabel="observed p", title="controls: p-values against uniform")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
