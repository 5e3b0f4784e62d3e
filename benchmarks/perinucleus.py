"""Perinucleus fingerprints on SmolLM2-135M: the trade-off of the number of keys N against FSR, perplexity and
embedding time, with the ownership decision (the README's Perinucleus table).

For each N the base model is fingerprinted with `perinucleus` (its defaults, N keys the model writes itself) and
evaluated: FSR (the answer begins with the target), the base model's own match rate on the same card (its FSR),
the false-positive rate, the ownership p-value of the fingerprinted and of the base model against the base model's
probability of each target, perplexity on held-out SQuAD paragraphs against the base model's, and the wall time of
the embedding (key writing, target drawing, fine-tuning). Settings other than N can be varied with --set.

    .venv/bin/python benchmarks/perinucleus.py [--n 16 64 256 1024] [--set epochs=5 ...] [--out runs/perinucleus]

Every N is written to OUT/<label>.json as soon as it is done, its model to OUT/<label>/ (for the Table 1 row:
`benchmarks/table1.py --existing perinucleus=OUT/n256`); re-running skips finished ones.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


def _value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def one(n: int, settings: dict, args, base_ppl: float, console) -> dict:
    from meraser.evaluation.fsr import fsr
    from meraser.evaluation.ownership import ownership, target_logprobs
    from meraser.evaluation.perplexity import corpus_perplexity
    from meraser.fingerprints import get_method
    from meraser.fingerprints.embed import embed
    from meraser.models import load_model

    label = "n{}{}".format(n, "".join(f"_{k}={v}" for k, v in sorted(settings.items())))
    record = args.out / f"{label}.json"
    cfg = get_method("perinucleus").Config.from_dict({"num_fingerprints": n, **settings}, where="--set: ")
    if record.exists():  # reused only when made with today's full config (the label names only --set)
        row = json.loads(record.read_text())
        if row.get("config") == cfg.to_dict():
            return row
        console.print(f"[yellow]{record} was made with other settings (defaults changed?): redoing it[/]")
    base, tok = load_model(args.model)
    t = time.perf_counter()
    fp, card, summary = embed("perinucleus", base, tok, cfg, args.out / label, overwrite=True, progress=True)
    seconds = round(time.perf_counter() - t, 1)
    clean, _ = load_model(args.model)
    null = target_logprobs(clean, tok, card)
    base_check = fsr(clean, tok, card, false_positive_inputs=0)
    row = {"n": n, "settings": settings, "fsr": summary["fsr"], "false_positive_rate": summary["false_positive_rate"],
           "base_match_rate": base_check["fsr"],
           "p_value": ownership([p["match"] for p in summary["per_trigger"]], null)["p_value"],
           "base_p_value": ownership([p["match"] for p in base_check["per_trigger"]], null)["p_value"],
           "expected_base_matches": sum(2.718281828 ** x for x in null),
           "ppl": corpus_perplexity(fp, tok, str(SHARED / "text/squaddev_v1.1.json"), max_windows=args.windows,
                                    progress=True)["ppl"],
           "base_ppl": base_ppl, "seconds": seconds, "config": cfg.to_dict()}
    record.write_text(json.dumps(row, indent=2))
    console.print(f"N={n}: {json.dumps(row)}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--set", nargs="*", default=[], help="perinucleus config fields, key=value")
    ap.add_argument("--out", type=Path, default=Path("runs/perinucleus"))
    ap.add_argument("--windows", type=int, default=50, help="512-token PPL windows of held-out SQuAD text")
    args = ap.parse_args()

    import transformers
    from rich.table import Table

    from meraser.evaluation.ownership import p_text
    from meraser.evaluation.perplexity import corpus_perplexity
    from meraser.models import load_model
    from meraser.utils import console as log_console

    transformers.utils.logging.set_verbosity_error()
    console = log_console(200)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: _value(v) for k, v in (s.split("=", 1) for s in args.set)}
    base_record = args.out / "base_ppl.json"
    if not base_record.exists():
        m, tok = load_model(args.model)
        ppl = corpus_perplexity(m, tok, str(SHARED / "text/squaddev_v1.1.json"), max_windows=args.windows,
                                progress=True)["ppl"]
        base_record.write_text(json.dumps({"ppl": ppl, "windows": args.windows}))
    base_ppl = json.loads(base_record.read_text())["ppl"]
    rows = [one(n, settings, args, base_ppl, console) for n in args.n]

    table = Table(title=f"Perinucleus on {args.model} ({settings or 'defaults'}; SQuAD PPL, {args.windows}x512 tokens)")
    for h in ["N", "FSR", "base match rate", "false positives", "p-value", "base p-value", "PPL (base)", "PPL rise",
              "embed time"]:
        table.add_column(h, justify="right")
    for r in rows:
        table.add_row(str(r["n"]), f"{r['fsr']:.1%}", f"{r['base_match_rate']:.1%}", f"{r['false_positive_rate']:.1%}",
                      p_text(r['p_value']), p_text(r['base_p_value']), f"{r['ppl']:.2f} ({r['base_ppl']:.2f})",
                      f"{r['ppl'] / r['base_ppl'] - 1:+.1%}", f"{r['seconds']:.0f} s")
    console.print(table)


if __name__ == "__main__":
    main()
