"""Running cells: one cell in its folder (peak memory, versions), the results store (rows appended once a cell has
finished), the sequential and Ray executors, and `run_bench` over them."""

from __future__ import annotations

import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from meraser.bench.plan import RESULTS, Cell, Matrix, cells_table, check_models, describe, fingerprint_label, plan_cells
from meraser.bench.shared import MADE, cell_experiment, fingerprint_folder, prepare_shared, shared_root, stale_cells
from meraser.utils import (LOCK_FILE, MeraserError, append_jsonl, check_parents, did_you_mean, exclusive, progress_bar,
                           read_json, read_jsonl, write_json)


class PeakMemory:
    """The peak resident memory of this process while a cell runs, sampled every 0.2 s (the cell runs here, so the
    process-wide high-water mark would carry over from earlier cells), and what was resident when it started.
    On exit the memory a finished cell freed is handed back to the system: on the Perinucleus matrix, before this,
    the peak grew from 5.9 to 8.3 GB over 12 cells in one process (`rss_at_start_mb` shows what carries over)."""

    def __enter__(self):
        import threading

        import psutil

        self.proc, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while True:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            if self.stop.wait(0.2):
                break

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        release_memory()


def release_memory() -> None:
    """Collect the finished cell's objects and return freed heap pages to the system (glibc keeps them otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("meraser", "torch", "transformers", "peft", "accelerate", "lm-eval", "torch-pruning"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run_cell(cell: Cell, out: Path, share: Path | None = None, overwrite: bool = False, on_stage=None,
             reevaluate_since: float | None = None) -> list[dict]:
    """Run (or finish) one cell's experiment; its rows for the store, each with the cell's settings and costs.
    `overwrite`: redo the stages its folder made under other settings (a stale cell run again); `on_stage(name)`:
    called as each of its stages begins; `reevaluate_since`: evaluate every stage again (`run_experiment`)."""
    from meraser.runner import Experiment, run_experiment

    share = share or out
    exp = cell_experiment(cell, out, share)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        rows = run_experiment(Experiment.from_dict(exp, where=f"cell {cell.id}: "), progress=False,
                              shared=share / "shared", overwrite=overwrite, on_stage=on_stage,
                              reevaluate_since=reevaluate_since)
    meta = {"cell": cell.id, "model": cell.model, "fingerprint": fingerprint_label(cell.fingerprint),
            "attack": cell.attack["method"], "seed": cell.seed, "grid": cell.grid, "settings": exp,
            "versions": versions(), "cell_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(mem.peak / 2**20), "rss_at_start_mb": round(mem.start / 2**20)}
    return [{**meta, **row} for row in rows]


def finished_cells(out: Path) -> set[str]:
    return {r["cell"] for r in read_jsonl(Path(out) / RESULTS, "results store", torn_tail_ok=True)}


def record(out: Path, rows: list[dict], replace: bool = False) -> None:
    """Add a finished cell's rows to the store in one atomic replace: all of them, or (killed) none. `replace`: they
    supersede the cell's stored rows (a re-verified or re-evaluated cell), whose `cell_seconds` they keep: the cost
    of the cell is what making it took; the revisit's own time goes to `reverified_seconds`."""
    from meraser.utils import write_jsonl

    stored = read_jsonl(out / RESULTS, "results store", torn_tail_ok=True)
    cells = {r["cell"] for r in rows} if replace else set()
    took = {r["cell"]: r["cell_seconds"] for r in stored if r["cell"] in cells and r.get("cell_seconds") is not None}
    rows = [{**r, "cell_seconds": took[r["cell"]], "reverified_seconds": r["cell_seconds"]} if r["cell"] in took
            else r for r in rows]
    write_jsonl(out / RESULTS, [r for r in stored if r["cell"] not in cells] + rows)


def unverified_cells(out: Path, cells: set[str]) -> set[str]:
    """Those of `cells` with a stored row that lacks a registered verification (made before it existed)."""
    from meraser.evaluation.verifications import missing

    return {r["cell"] for r in read_jsonl(Path(out) / RESULTS, "results store", torn_tail_ok=True)
            if r["cell"] in cells and missing(r)}


FAILED = "failed.jsonl"


EXECUTORS = ("sequential", "ray")


@dataclass
class Executor:
    """How cells run: one after another here, or each as a Ray task asking for its CPUs/GPUs (`pip install
    meraser[ray]`), on this machine or on a cluster at `address`."""

    kind: str = "sequential"
    address: str | None = None  # a Ray cluster ("auto", "ray://host:10001"); None: a local Ray instance
    cpus_per_cell: float = 1.0
    gpus_per_cell: float = 0.0

    def check(self) -> None:
        import importlib.util

        if self.kind not in EXECUTORS:
            raise MeraserError(f"unknown executor '{self.kind}'{did_you_mean(self.kind, EXECUTORS)} "
                               f"(choices: {', '.join(EXECUTORS)})")
        if self.kind == "ray" and importlib.util.find_spec("ray") is None:
            raise MeraserError("--executor ray needs Ray: pip install 'meraser[ray]'")
        if self.cpus_per_cell <= 0 or self.gpus_per_cell < 0:
            raise MeraserError("a cell needs more than 0 CPUs and at least 0 GPUs")


def run_bench(matrix: Matrix, *, where: str = "", dry_run: bool = False, only: list[str] | None = None,
              progress: bool = True, console=None, executor: Executor | None = None,
              redo_stale: bool = False, reverify: bool = False, reevaluate: bool = False) -> dict:
    """Check the whole matrix, then run every cell not yet in the store (with `only`, those whose id contains one
    of its strings). A finished cell that today's defaults would make differently (`stale_cells`) is refused,
    naming what changed, unless `redo_stale`: then its rows leave the store and it runs again. With `reverify`, a
    finished cell whose rows predate a registered verification runs again too: its stored models (made again where
    not kept) get just the missing verifications, and its rows are replaced by the completed ones. With
    `reevaluate`, every finished cell (of `only`) has all its stages evaluated again on its stored models, after a
    fix to the evaluation; training and attacks are not redone. Returns {cells, done, ran, failed, stale,
    reverified} (re-evaluated cells count as re-verified); with `dry_run`, only lists the cells and what is done or
    stale."""
    executor = executor or Executor()
    executor.check()
    out = Path(matrix.out).resolve()  # cells see one absolute path, whichever process or machine runs them
    share = shared_root(matrix)
    cells = plan_cells(matrix, where)
    check_models(matrix, where)
    check_bench_folder(out, f"{where}out")
    if share != out:
        check_bench_folder(share, f"{where}shared")
    check_cards(cells, share, where)
    if dry_run:
        return _run_bench(matrix, cells, out, share, where, True, only, progress, console, executor, redo_stale,
                          reverify, reevaluate)
    with exclusive(out, "bench folder"), (exclusive(share, "shared folder") if share != out else nullcontext()):
        return _run_bench(matrix, cells, out, share, where, False, only, progress, console, executor, redo_stale,
                          reverify, reevaluate)


def _run_bench(matrix: Matrix, cells: list[Cell], out: Path, share: Path, where: str, dry_run: bool,
               only: list[str] | None, progress: bool, console, executor: Executor, redo_stale: bool,
               reverify: bool = False, reevaluate: bool = False) -> dict:
    """`run_bench` once its inputs are checked and (unless `dry_run`) its folders locked."""
    done = finished_cells(out)
    wanted = [c for c in cells if not only or any(o in c.id for o in only)]
    if not wanted:
        raise MeraserError(f"{where}--only {' '.join(only)}: no cell id contains it (ids look like "
                           f"{cells[0].id})")
    stale = stale_cells(wanted, done, out, share)
    if console:
        console.print(cells_table(cells, done, stale, wanted))
    if stale and not dry_run:
        _settle_stale(stale, out, done, redo_stale, where)
    again = _revisited(out, wanted, done, reverify, reevaluate)
    since = time.time() if reevaluate else None  # a shared row written after this was re-evaluated by this run
    todo = [c for c in wanted if c.id not in done or c.id in again]
    n_done = sum(c.id in done for c in cells)
    if not dry_run:  # the report plans the cells from this record: a matrix edited since its last cell counts too
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "matrix.json", matrix.to_dict())
    if dry_run or not todo:
        return {"cells": len(cells), "done": n_done, "ran": 0, "failed": [], "stale": sorted(stale),
                "reverified": 0 if not dry_run else len(again)}
    prepare_shared(todo, share, console, progress)
    store = _Store(out, again, matrix.keep_models, console)
    _execute(todo, out, share, executor, store, redo=set(stale) if redo_stale else set(), since=since,
             already=n_done - len(again), progress=progress, console=console)
    failed = store.failed
    return {"cells": len(cells), "done": n_done, "ran": len(todo) - len(again) - len(set(failed) - again),
            "failed": failed, "stale": sorted(stale) if not redo_stale else [],
            "reverified": len(again - set(failed))}


def _revisited(out: Path, wanted: list[Cell], done: set[str], reverify: bool, reevaluate: bool) -> set[str]:
    """The finished cells of `wanted` this run visits again: all of them (`reevaluate`), or (`reverify`) those whose
    rows lack a registered verification."""
    finished = {c.id for c in wanted} & done
    if reevaluate:
        return finished
    return unverified_cells(out, finished) if reverify else set()


class _Store:
    """What happens as a cell ends: its rows into the store (replacing a revisited cell's) or its failure into the
    failure log. The driver alone writes both, whichever executor ran the cell."""

    def __init__(self, out: Path, again: set[str], keep_models: bool, console):
        self.out, self.again, self.keep_models, self.console = out, again, keep_models, console
        self.failed: list[str] = []

    def __call__(self, cell: Cell, rows: list[dict] | None, error: BaseException | None) -> None:
        if error is None:
            record(self.out, rows, replace=cell.id in self.again)
            if not self.keep_models:
                drop_attacked_model(self.out / "cells" / cell.id)
            return
        self.failed.append(cell.id)  # one broken cell must not stop the matrix; it is retried on the next run
        import traceback

        where_ = "".join(traceback.format_tb(error.__traceback__)[-3:]) if error.__traceback__ else ""
        append_jsonl(self.out / FAILED, {"cell": cell.id, "error": f"{type(error).__name__}: {error}"[:2000],
                                         "traceback": where_[-3000:], "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if self.console:
            self.console.print(f"[red]cell {cell.id} failed[/]: {type(error).__name__}: {str(error)[:300]}")


def _execute(todo: list[Cell], out: Path, share: Path, executor: Executor, finished, *, redo: set[str],
             since: float | None, already: int, progress: bool, console) -> None:
    """Run `todo` on the executor under one progress bar (`already`: cells counted as done before it starts)."""
    with progress_bar(progress) as bar:
        task = bar.add_task("matrix", total=already + len(todo), completed=already)

        def done(cell, rows, error):
            finished(cell, rows, error)
            bar.advance(task)

        if executor.kind == "ray":
            _run_on_ray(todo, out, share, executor, done, redo=redo, since=since)
            return
        # one cell at a time: the bar names the cell and the stage that runs (their own steps show no bar inside
        # the bench's, and a cell of a 270M model runs for 20 minutes)
        def stage(cell, name=None):
            label = f"matrix: {_cell_label(cell)}" + (f" · {name}" if name else "")
            bar.update(task, description=label)
            if console is not None and not console.is_terminal:  # a log file gets no live bar: a line instead
                console.print(f"{time.strftime('%H:%M:%S')} {label}", highlight=False)

        _run_here(todo, out, share, done, redo=redo, started=stage, since=since)


# what a bench writes in its folders: `out` may be a new or empty folder, or one that holds only these
BENCH_ENTRIES = {"matrix.json", RESULTS, FAILED, MADE, "report.html", "cells", "fingerprints", "shared", LOCK_FILE}


def check_bench_folder(folder: Path, where: str) -> None:
    """Refuse, before anything is written, a bench folder that is a file, or a non-empty folder that no bench wrote
    (its files would sit among the bench's and a `--redo-stale` could remove them)."""
    check_parents(folder)
    if folder.exists() and not folder.is_dir():
        raise MeraserError(f"{where}: {folder} is a file, not a folder")
    if folder.is_dir() and not (folder / "matrix.json").is_file():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in BENCH_ENTRIES)
        if foreign:
            raise MeraserError(f"{where}: {folder} is a folder that no meraser bench wrote (it holds "
                               f"{', '.join(foreign[:5])}); give a new or empty folder")


def check_cards(cells: list[Cell], share: Path, where: str) -> None:
    """Load every card the cells will read before any cell runs (a tampered or truncated card fails its checksum
    here, once, rather than in every cell): those of existing fingerprinted models, and those of the shared
    fingerprinted models already made."""
    from meraser.fingerprints.card import Card
    from meraser.runner import existing_card

    paths = set()
    for cell in cells:
        fp = cell.fingerprint
        # a shared fingerprinted model already made is an existing one too
        card = existing_card(fp["existing"] or str(fingerprint_folder(share, cell)), fp.get("card"))
        if card:
            paths.add(card)
    for path in sorted(paths):
        try:
            Card.load(path)
        except MeraserError as e:
            raise MeraserError(f"{where}{e}") from None


def _settle_stale(stale: dict[str, str], out: Path, done: set[str], redo: bool, where: str) -> None:
    """Refuse to run a matrix with stale cells, naming what changed; or (`redo`) take their rows out of the store
    and out of `done`, so that they run again."""
    if not redo:
        first = next(iter(stale))
        raise MeraserError(f"{where}{len(stale)} finished cell(s) were made under other settings than this matrix "
                           f"resolves to today (a default has changed since), e.g. {first}: {stale[first]}. Pass "
                           f"--redo-stale to run them again (their rows are replaced), or pin the old settings in "
                           f"the matrix")
    _forget(out, set(stale))
    done -= set(stale)


def drop_attacked_model(folder: Path) -> None:
    """Delete a finished cell's attacked model, and its stage record with it: the cell stays done (its rows are in
    the store), and a cell run again (--redo-stale) makes the attack again instead of loading a model that is gone."""
    from meraser.runner import STAGE_RECORD
    from meraser.utils import write_json

    if not (folder / "attacked").is_dir():
        return
    records = read_json(folder / STAGE_RECORD, "stage record") if (folder / STAGE_RECORD).is_file() else {}
    records.pop("attacked", None)
    write_json(folder / STAGE_RECORD, records)  # first: a kill between the two leaves a folder that is remade
    shutil.rmtree(folder / "attacked")


def _forget(out: Path, cells: set[str]) -> None:
    """Take cells' rows out of the store (one atomic replace), so that they run again."""
    from meraser.utils import write_jsonl

    rows = read_jsonl(out / RESULTS, "results store", torn_tail_ok=True)
    write_jsonl(out / RESULTS, [r for r in rows if r["cell"] not in cells])


def _cell_label(cell: Cell) -> str:
    setting = describe(cell)
    return f"{fingerprint_label(cell.fingerprint)} x {cell.attack['method']}" + (f" ({setting})" if setting else "")


def _run_here(cells: list[Cell], out: Path, share: Path, finished, redo: set[str], started=None,
              since: float | None = None) -> None:
    """The cells one after another; `started(cell)` as each begins, and `started(cell, stage)` as each of its stages
    does. `since`: re-evaluate them (`run_cell`)."""
    for cell in cells:
        if started:
            started(cell)
        try:
            rows = run_cell(cell, out, share, cell.id in redo,
                            on_stage=(lambda name, cell=cell: started(cell, name)) if started else None,
                            reevaluate_since=since)
        except Exception as e:
            finished(cell, None, e)
        else:
            finished(cell, rows, None)


def _run_on_ray(cells: list[Cell], out: Path, share: Path, executor: Executor, finished, redo: set[str],
                since: float | None = None) -> None:
    """Each cell a Ray task with the CPUs/GPUs it asks for; results come back to the driver as they finish."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=executor.address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=executor.cpus_per_cell, num_gpus=executor.gpus_per_cell, max_retries=0)(run_cell)
        pending = {task.remote(cell, out, share, cell.id in redo, reevaluate_since=since): cell for cell in cells}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            cell = pending.pop(ready[0])
            try:
                rows = ray.get(ready[0])
            except Exception as e:  # the cell's own exception, wrapped by Ray
                finished(cell, None, getattr(e, "cause", None) or e)
            else:
                finished(cell, rows, None)
    finally:
        if started_here:
            ray.shutdown()


