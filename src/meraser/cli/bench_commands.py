"""`attack`, `bench` and `report`: attacks one at a time, as a matrix, and the page over them."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from meraser.cli.common import (
    MODEL_HELP,
    JsonOut,
    Overwrite,
    TrustRemoteCode,
    app,
    decoding_attacks,
    parse_sets,
    quiet_libraries,
)
from meraser.utils import console as _console


@app.command()
def bench(
    matrix: Path = typer.Argument(..., help="matrix YAML: models, fingerprints, attacks, seeds, grid "
                                            "(benchmarks/matrix_*.yaml)"),
    out: Optional[Path] = typer.Option(None, help="override the matrix's output folder",
                                       show_default="the YAML's `out`"),
    dry_run: bool = typer.Option(False, "--dry-run", help="list the cells and which are done; run nothing"),
    only: Optional[List[str]] = typer.Option(None, help="run only the cells whose id contains this text (e.g. an "
                                                        "attack or fingerprint name); repeat for several",
                                             show_default="every cell"),
    executor: str = typer.Option("sequential", help="sequential (here, one cell after another) or ray (each cell "
                                                    "a Ray task: pip install 'meraser\\[ray]')"),
    address: Optional[str] = typer.Option(None, help="Ray cluster address (e.g. auto)",
                                          show_default="a local Ray instance"),
    cpus_per_cell: float = typer.Option(1.0, help="CPUs each Ray task asks for"),
    gpus_per_cell: float = typer.Option(0.0, help="GPUs each Ray task asks for (1 on a GPU machine)"),
    redo_stale: bool = typer.Option(False, "--redo-stale", help="run again the finished cells that today's defaults "
                                                                "would make differently (refused otherwise)"),
    reverify: bool = typer.Option(False, "--reverify", help="measure on finished cells' stored models (made again "
                                  "where not kept) the verifications registered since they ran"),
    reevaluate: bool = typer.Option(False, "--reevaluate", help="evaluate every stage of the finished cells again on "
                                    "their stored models, after a fix to the evaluation (training and attacks are "
                                    "kept; narrow it with --only)"),
):
    """Run a fingerprint x attack matrix: every cell an experiment in its own folder, fingerprinted models and
    MEraser's transfer adapter made once and shared, one results store. Re-running skips finished cells."""
    from meraser.bench import Executor, load_matrix, run_bench

    quiet_libraries()
    m = load_matrix(matrix)
    if out:
        m.out = str(out)
    res = run_bench(m, where=f"{matrix}: ", dry_run=dry_run, only=only, console=_console(200),
                    executor=Executor(executor, address, cpus_per_cell, gpus_per_cell), redo_stale=redo_stale,
                    reverify=reverify, reevaluate=reevaluate)
    if not dry_run:
        from meraser.report import write_bench_report

        page = write_bench_report(m.out, Path(m.out) / "report.html")
        _console().print(f"{res['ran']} cells run, {res['done']} were done already"
                         + (f" ({res['reverified']} re-evaluated)" if reevaluate else
                            f" ({res['reverified']} re-verified)" if reverify else "")
                         + f", {len(res['failed'])} failed "
                         f"(see {m.out}/failed.jsonl; a re-run retries them); results: {m.out}/results.jsonl; "
                         f"report: {page}")
    if res["failed"]:
        raise typer.Exit(1)


def _attack_help() -> str:
    from meraser.attacks import REGISTRY

    lines = "\n\n".join(f"[bold]{name}[/]: {a.summary}" for name, a in REGISTRY.items())
    return ("Run one erasure attack on a (fingerprinted) model and save the attacked model, which `verify`, "
            f"`evaluate` and `chat` load unchanged; a decoding-time attack ({decoding_attacks()}) changes no weight "
            "and saves its record instead, for `verify --attack` and `chat --attack`. Settings: --set KEY=VALUE (the "
            "attack's config fields).\n\n" + lines)


@app.command(help=_attack_help(),
             short_help="Run one erasure attack on a model: a changed model, or a decoding-time attack's record.")
def attack(
    method: str = typer.Option(..., "--method", help="registered attack name (listed above)"),
    model: str = typer.Option(..., "--model", "-m", help="the model to attack: " + MODEL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="output folder for the attacked model (a decoding-time "
                             "attack writes its record and extracted sequences there instead)"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="attack setting, e.g. --set sparsity=0.3; repeat",
                                             show_default="the attack's defaults"),
    base: Optional[str] = typer.Option(None, help="the base model the attacked model derives from (merging, "
                                       "transfer)", show_default="the base recorded with the model"),
    overwrite: Overwrite = False,
    json_out: JsonOut = False,
    trust_remote_code: TrustRemoteCode = False,
):
    import json

    from meraser.attacks import run_attack
    from meraser.fingerprints.embed import model_dir

    quiet_libraries()
    s = run_attack(method, model_dir(model), out, parse_sets(set_), base=base, overwrite=overwrite,
                   progress=not json_out, trust_remote_code=trust_remote_code)
    if json_out:
        print(json.dumps(s, indent=2, ensure_ascii=False, default=str))
        return
    details = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("attack", "config", "out", "seconds", "base"))
    what = "attack record" if (Path(s["out"]) / "attack.json").exists() else "model"
    _console().print(f"[green]{method}[/] {what} saved to {s['out']} in {s['seconds']} s" +
                     (f" ({details})" if details else ""))


@app.command()
def report(
    runs: List[Path] = typer.Argument(..., help="run folders written by `meraser run` / `meraser demo`, or "
                                                "`meraser bench` folders (several read as one matrix)"),
    out: Path = typer.Option(Path("report.html"), "--out", "-o", help="HTML file to write"),
    title: Optional[str] = typer.Option(None, help="page title (default: 'MEraser report', or 'meraser bench' "
                                                   "for a bench folder)"),
    show_secrets: bool = typer.Option(False, help="print the card's triggers, targets and matching outputs (hashed "
                                                  "by default: a report is made to be shared)"),
    markdown: Optional[Path] = typer.Option(None, help="also write the tables as Markdown to this file"),
    figures: Optional[Path] = typer.Option(None, help="also write the page's figures as PNG files into this folder"),
    overwrite: bool = typer.Option(False, help="replace existing output files; only pages, tables and figures that "
                                               "meraser report wrote are ever replaced"),
):
    """One HTML page for finished runs (Table 1, FSR per erase/recover epoch, per-trigger outputs), or for
    `meraser bench` folders (every cell's status, the attack table, which fingerprint survives which attack and the
    leaderboards as well)."""
    from meraser.report import make_report, terminal_tables

    console = _console(200)
    rep = make_report(runs, out, title=title, show_secrets=show_secrets, markdown=markdown, figures=figures,
                      overwrite=overwrite)
    for table in terminal_tables(rep.runs, rep.cells):
        console.print(table)
    if rep.timing:
        console.print(rep.timing)
    if rep.markdown:
        console.print(f"[green]tables[/] written to {rep.markdown}")
    if rep.figures:
        console.print(f"[green]figures[/] written to {figures}: {', '.join(p.name for p in rep.figures)}")
    console.print(f"[green]report[/] written to {rep.page}")

