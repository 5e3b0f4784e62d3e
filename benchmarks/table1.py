"""The paper's Table 1 on SmolLM2-135M, plus the transferable adapter: every figure in the README's MEraser section.

For each fingerprint method (if-sft, utf, chain-hash) this runs the same pipeline as `meraser run`: fingerprint the
base model with the method's defaults, then erase (paper preset, 300 mismatched chitchat rows) and recover (paper
preset, 600 clean chitchat rows), evaluating base, fingerprinted, erased and recovered models: FSR, false-positive
rate, perplexity on held-out SQuAD paragraphs, FSR after every erase/recover epoch, Algorithm-1 verdict. Then it
trains the erase adapter once on the clean base (`meraser transfer train`) and merges it into each fingerprinted
model (`meraser transfer apply`), reporting the FSR that is left and the perplexity.

    .venv/bin/python benchmarks/table1.py [--methods if-sft utf chain-hash] [--out runs/table1] [--windows 100]

Re-running resumes: finished stages are read back from each method's results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared/data"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=["if-sft", "utf", "chain-hash"])
    ap.add_argument("--out", type=Path, default=Path("runs/table1"))
    ap.add_argument("--windows", type=int, default=100, help="512-token PPL windows of held-out SQuAD text")
    ap.add_argument("--no-transfer", action="store_true")
    ap.add_argument("--existing", nargs="*", default=[], metavar="METHOD=FOLDER",
                    help="use a fingerprint made elsewhere for METHOD (e.g. perinucleus=runs/perinucleus/n256)")
    ap.add_argument("--preset", default="paper", help="erase and recover preset")
    ap.add_argument("--magpie", type=float, default=0.0,
                    help="share of Magpie rows in recovery (0: the paper's data, source rows only; "
                         "-1: meraser's default share)")
    args = ap.parse_args()
    existing = dict(e.split("=", 1) for e in args.existing)

    import transformers
    from meraser.utils import console as log_console
    from rich.table import Table

    from meraser.runner import Experiment, run_experiment
    from meraser.fingerprints.embed import CARD_FILE

    transformers.utils.logging.set_verbosity_error()
    console = log_console(220)  # a log file gets the whole table, not 80 columns
    evalcfg = {"ppl": str(SHARED / "text/squaddev_v1.1.json"), "ppl_windows": args.windows,
               "false_positive_inputs": 32}
    rows = {}
    for method in args.methods:
        t = time.perf_counter()
        fp = {"existing": existing[method]} if method in existing else {"method": method}
        exp = Experiment.from_dict({"model": args.model, "out": str(args.out / method), "fingerprint": fp,
                                    "erase": {"preset": args.preset}, "recover": {"preset": args.preset},
                                    "clean": {"magpie": args.magpie} if args.magpie >= 0 else {},
                                    "eval": evalcfg})
        stages = run_experiment(exp, console=console, progress=True)
        rows[method] = {r["stage"]: r for r in stages}
        console.print(f"[bold]{method}[/] done in {time.perf_counter() - t:.0f} s")

    transfer = {}
    if not args.no_transfer:
        from meraser.erase.transfer import transfer_apply, transfer_train
        from meraser.evaluation.evaluate import EvalConfig, evaluate_model
        from meraser.fingerprints.card import Card
        from meraser.models import load_model

        adapter = args.out / "transfer_adapter"
        t = time.perf_counter()
        if not (adapter / "adapter_config.json").exists():
            transfer_train(args.model, adapter)
            transfer["train_seconds"] = round(time.perf_counter() - t, 1)
        elif (args.out / "table1.json").exists():  # resumed: keep the time the adapter took when it was trained
            transfer["train_seconds"] = json.loads((args.out / "table1.json").read_text())["transfer"].get("train_seconds")
        for method in args.methods:
            fp = Path(existing[method]) if method in existing else args.out / method / "fingerprinted"
            merged = args.out / method / "transfer_applied"
            if not (merged / "config.json").exists():
                transfer_apply(adapter, str(fp / "model"), merged)
            m, tok = load_model(str(merged))
            r = evaluate_model(m, tok, EvalConfig.from_dict(evalcfg), Card.load(fp / CARD_FILE))
            transfer[method] = {"fsr": r["fsr"], "ppl": r["ppl"]["ppl"]}

    table = Table(title=f"MEraser on {args.model}: FSR and perplexity (held-out SQuAD, {args.windows}x512 tokens)")
    for h in ["method", "base FSR", "base PPL", "fp FSR", "fp FP", "fp PPL", "fp time", "erased FSR", "erased PPL",
              "recovered FSR", "recovered PPL", "FSR per erase epoch", "FSR per recover epoch", "strict (erased / "
              "recovered)", "p-value (fp / recovered)", "ordinary (fp / recovered / bar)", "Alg. 1",
              "transfer FSR / PPL"]:
        table.add_column(h, justify="right")
    for method, r in rows.items():
        b, f, e, c = r["base"], r["fingerprinted"], r["erased"], r["recovered"]
        per = lambda s: " ".join(f"{p['fsr']:.2f}" for p in s.get("fsr_per_epoch", [])) or "-"  # noqa: E731
        table.add_row(method, f"{b['fsr']:.1%}", f"{b['ppl']['ppl']:.2f}", f"{f['fsr']:.1%}",
                      f"{f['false_positive_rate']:.1%}", f"{f['ppl']['ppl']:.2f}", f"{f.get('fingerprint_seconds')} s",
                      f"{e['fsr']:.1%}", f"{e['ppl']['ppl']:.2f}", f"{c['fsr']:.1%}", f"{c['ppl']['ppl']:.2f}",
                      per(e), per(c), _strict(e, c), _pvalues(f, c), _ordinary(f, c), str(c.get("erased")),
                      f"{transfer[method]['fsr']:.1%} / {transfer[method]['ppl']:.2f}" if method in transfer else "-")
    console.print(table)
    (args.out / "table1.json").write_text(json.dumps({"rows": rows, "transfer": transfer}, indent=2))
    console.print(f"written {args.out / 'table1.json'}")


def _strict(e: dict, c: dict) -> str:
    """Whether each stage is erased under the strict check (every check back at the base model's level)."""
    return " / ".join(str(r.get("strict", {}).get("erased_strict", "-")) for r in (e, c))


def _pvalues(f: dict, c: dict) -> str:
    from meraser.evaluation.ownership import p_text

    return " / ".join(p_text(r['ownership']['p_value']) if "ownership" in r else "-" for r in (f, c))


def _ordinary(f: dict, c: dict) -> str:
    cells = [f"{r['ordinary_accuracy']:.0%}" if r.get("ordinary_accuracy") is not None else "-" for r in (f, c)]
    return " / ".join(cells + [f"{c['utility_bar']:.0%}" if "utility_bar" in c else "-"])


if __name__ == "__main__":
    main()
