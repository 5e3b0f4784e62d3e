"""A served suspect against its local self: each fingerprint folder's model is served by `transformers serve` (fp32,
CPU) and verified over HTTP with `meraser verify --endpoint` (chat and completions APIs), beside `meraser verify
--model` on the same weights (fp32 too, so no bf16 near-tie splits them). Prints FSR and false positives both ways,
how many outputs are identical, the requests and the wall time of each. With --strict, the strict checks instead,
both ways (the completions API, against the card's base model held locally): each check's value and the verdict.

    .venv/bin/python benchmarks/served_verify.py runs/smollm2-135m/fingerprints/*/ [--concurrency 4] [--threads 2]
    .venv/bin/python benchmarks/served_verify.py FOLDER --strict
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", help="fingerprint output folders (model/ and the card)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    ap.add_argument("--strict", action="store_true", help="the strict checks, local and served, instead")
    args = ap.parse_args()
    os.environ["MERASER_PRECISION"] = "fp32"

    from rich.table import Table

    from meraser.evaluation.served import EndpointConfig, served_verify, transformers_server
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import model_dir, verify
    from meraser.utils import console

    if args.strict:
        return console(log_width=200).print(strict_table(args.folders, args.concurrency, args.threads))
    t = Table(title="served verify against the local verify (same weights, fp32)")
    for col in ("card", "path", "FSR", "false positives", "identical outputs", "requests", "seconds"):
        t.add_column(col)
    for folder in args.folders:
        card, model = Card.load(folder), model_dir(folder)
        t0 = time.perf_counter()
        local = verify(model, folder, progress=True)
        t.add_row(card.method, "local (--model)", f"{local['fsr']:.0%}", f"{local['false_positive_rate']:.0%}", "",
                  "", f"{time.perf_counter() - t0:.1f}")
        with transformers_server(model, threads=args.threads) as url:
            for api in ("chat", "completions"):
                cfg = EndpointConfig.from_dict({"url": url, "api": api, "concurrency": args.concurrency})
                r = served_verify(cfg, folder, progress=True)
                same = sum(a["output"] == b["output"] for a, b in zip(local["per_trigger"], r["per_trigger"]))
                t.add_row(card.method, f"served, {api}", f"{r['fsr']:.0%}", f"{r['false_positive_rate']:.0%}",
                          f"{same}/{len(card.triggers)}", str(r["requests"]), f"{r['seconds']:.1f}")
    console().print(t)


def strict_table(folders: list[str], concurrency: int, threads: int):
    """The strict checks on the weights and through the completions API, against the card's base model."""
    from rich.table import Table

    from meraser.evaluation.served import EndpointConfig, served_strict, transformers_server
    from meraser.evaluation.strict import CHECKS, strict_verify
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import model_dir

    def cell(k, v):
        return "not run" if v is None else (f"{v:.2f}" if k == "loglik" else f"{v:.0%}")

    t = Table(title="strict checks: local against served (completions API), base model held locally")
    for col in ("card", "path", *CHECKS, "erased strictly", "requests", "seconds"):
        t.add_column(col)
    for folder in folders:
        card, model = Card.load(folder), model_dir(folder)
        t0 = time.perf_counter()
        local = strict_verify(model, folder, card.base_model)
        t.add_row(card.method, "local", *(cell(k, local[k]) for k in CHECKS), str(local["erased_strict"]), "",
                  f"{time.perf_counter() - t0:.1f}")
        with transformers_server(model, threads=threads) as url:
            cfg = EndpointConfig.from_dict({"url": url, "api": "completions", "concurrency": concurrency})
            r = served_strict(cfg, folder, card.base_model, progress=True)
        t.add_row(card.method, "served", *(cell(k, r[k]) for k in CHECKS), str(r["erased_strict"]),
                  str(r["requests"]), f"{r['seconds']:.1f}")
    return t


if __name__ == "__main__":
    main()
