"""`meraser bench MATRIX.yaml`: models x fingerprints x attacks x seeds x settings, one resumable matrix.

Every cell is an experiment (`meraser.runner`) in its own folder, OUT/cells/<cell id>/: `meraser` runs erase and
recover as stages (the rows of the paper's Table 1, with FSR after every epoch), any other registered attack runs
as the experiment's `attack:` stage (Tables 2 and 3). What several cells need is made once, before them, and shared:
each fingerprinted model (per model, fingerprint and seed, in SHARED/fingerprints/) and MEraser's transferable erase
adapter (per model and seed, in SHARED/shared/), where SHARED is the matrix's `shared` folder (its `out` by default);
cells also share their base and fingerprinted evaluations and identical erase/recover stages there.

The results store, OUT/results.jsonl, holds one row per cell and stage, with the cell's full settings, package
versions, seed, wall time and peak memory. Only this driver writes it, and only after a cell has finished, all of
the cell's rows in one append: a killed bench leaves finished cells in the store and at most one cell half-done in
its folder, which the next run finishes (its stages resume or redo cleanly, see runner.py) before its rows are
written. A cell whose rows are in the store is never run again, so no row is written twice.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from meraser.config import Config, field, key_path, load_yaml
from meraser.models import DEFAULT_MODEL
from meraser.utils import (LOCK_FILE, MeraserError, append_jsonl, atomic_dir, check_parents, did_you_mean, exclusive,
                           progress_bar, read_json, read_jsonl, write_json)

RESULTS = "results.jsonl"
ERASE_RECOVER = "meraser"  # this attack name runs as the experiment's erase and recover stages


@dataclass
class Matrix(Config):
    out: str = field("runs/bench", help="output folder: cells/ and the results store (and fingerprints/ and shared/ "
                                        "unless `shared` says where)")
    shared: str | None = field(None, help="folder for what cells share (fingerprints/, shared/): give two matrices "
                                          "on the same model the same one and they share those too (default: out)")
    models: list[str] = field([DEFAULT_MODEL], help="base models (folders, hub ids or the embedded alias)")
    fingerprints: list[dict] = field([{"method": "utf"}], help="each an experiment's `fingerprint:` stage: "
                                                               "{method, config} to make, or {existing, card}")
    attacks: list = field([ERASE_RECOVER], help="attack names, or {method, config}; 'meraser' runs erase and "
                                                "recover as stages (Table 1), the others as an attack stage")
    seeds: list[int] = field([0], help="each cell runs once per seed (fingerprint, data draws, training)")
    grid: dict = field({}, help="experiment keys (dotted, e.g. mismatched.n) -> list of values: every combination "
                                "is a cell")
    experiment: dict = field({}, help="experiment settings every cell shares (eval, erase, recover, clean, ...)")
    keep_models: bool = field(True, help="keep each attack cell's attacked model (a full copy of the model: 0.5 GB "
                                         "on SmolLM2-135M, 14 GB on a 7B model); false: delete it once the cell's "
                                         "rows are in the store (erase/recover adapters are small and kept)")

    def validate(self, where: str) -> None:
        for name in ("models", "fingerprints", "attacks", "seeds"):
            if not getattr(self, name):
                raise MeraserError(f"{key_path(where, name)}: give at least one")
        _check_grid(self.grid, key_path(where, "grid"))


@dataclass
class Cell:
    id: str  # readable and unique: model, fingerprint, attack, seed, grid values, and a hash of all settings
    model: str
    fingerprint: dict
    attack: dict  # {method, config}
    seed: int
    grid: dict
    experiment: dict  # the cell's experiment, less `out` and the shared fingerprint (filled in when it runs)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-")[:40]


def _attack(entry, where: str) -> dict:
    """{method, config, grid}: an attack name, or a dict with its config and a grid of its own (settings that only
    this attack varies, e.g. `mismatched.n` for meraser or `attack.config.weights` for a merge)."""
    from meraser.runner import AttackStage

    a = {"method": entry} if isinstance(entry, str) else dict(entry) if isinstance(entry, dict) else None
    if a is None:
        raise MeraserError(f"{where}: an attack name or {{method, config, grid}}, got {entry!r}")
    grid = a.pop("grid", {})
    _check_grid(grid, key_path(where, "grid"))
    AttackStage.from_dict(a, where=where)  # unknown attack or setting: refused with the nearest name
    return {"method": a["method"], "config": a.get("config", {}), "grid": grid}


def _check_grid(grid, where: str) -> None:
    if not isinstance(grid, dict):
        raise MeraserError(f"{where}: a mapping of experiment keys to lists of values")
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise MeraserError(f"{key_path(where, k)}: a non-empty list of values")
        _no_duplicates(values, f"{where}.", k)


def _fingerprint_label(fp: dict) -> str:
    if fp.get("existing"):
        return _slug(Path(fp["existing"]).name)
    return _slug(fp.get("method", "utf")) + ("-" + _hash(fp["config"])[:6] if fp.get("config") else "")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _nested(dotted: dict) -> dict:
    out: dict = {}
    for key, value in dotted.items():
        *parents, last = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _seeded(exp: dict, seed: int) -> dict:
    """The matrix seed drives every draw and every training of a cell (over what `experiment:` says)."""
    return _merge(exp, {"mismatched": {"seed": seed}, "clean": {"seed": seed},
                        "erase": {"overrides": {"seed": seed}}, "recover": {"overrides": {"seed": seed}}})


def _attack_with_seed(attack: dict, seed: int) -> dict:
    from meraser.attacks import get_attack

    fields = get_attack(attack["method"]).Config.__dataclass_fields__
    return {**attack, "config": {**attack["config"], **({"seed": seed} if "seed" in fields else {})}}


def plan_cells(matrix: Matrix, where: str = "") -> list[Cell]:
    """Every cell of the matrix, each cell's experiment checked (unknown keys and names refused, naming the key and
    the nearest valid name) before anything runs."""
    from meraser.runner import FingerprintStage

    fps = [FingerprintStage.from_dict(fp, where=f"{where}fingerprints[{i}]").to_dict()
           for i, fp in enumerate(matrix.fingerprints)]
    attacks = [_attack(a, f"{where}attacks[{i}]") for i, a in enumerate(matrix.attacks)]
    for name, items in [("models", matrix.models), ("fingerprints", fps), ("attacks", attacks),
                        ("seeds", matrix.seeds)]:
        _no_duplicates(items, where, name)
    cells = []
    for model, fp, attack, seed in itertools.product(matrix.models, fps, attacks, matrix.seeds):
        grid = {**matrix.grid, **attack["grid"]}
        for values in itertools.product(*grid.values()):
            cells.append(_cell(matrix, model, fp, attack, seed, dict(zip(grid, values)), where))
    ids: dict[str, Cell] = {}
    for cell in cells:  # what the lists above cannot show (a grid value that repeats an attack's own setting)
        if cell.id in ids:
            raise MeraserError(f"{where}two entries plan the same cell {cell.id}; list each setting once")
        ids[cell.id] = cell
    return cells


def _no_duplicates(items: list, where: str, name: str) -> None:
    """Refuse an entry listed twice (`seeds: [0, 0]`, an attack twice): it would plan one cell twice, run it twice
    and store its rows twice."""
    seen: list = []
    for i, item in enumerate(items):
        if item in seen:
            raise MeraserError(f"{where}{name}[{i}]: the same as {name}[{seen.index(item)}] "
                               f"({json.dumps(item, default=str)}); list each once")
        seen.append(item)


def _cell(matrix: Matrix, model: str, fp: dict, attack: dict, seed: int, combo: dict, where: str) -> Cell:
    """One cell, its experiment checked."""
    from meraser.runner import Experiment

    stage = {"method": attack["method"], "config": attack["config"]}
    erase_recover = attack["method"] == ERASE_RECOVER  # its config (mismatched, clean, erase, recover) is the
    exp = _merge(matrix.experiment, attack["config"] if erase_recover else {})  # experiment's own keys
    exp = _seeded(_merge(exp, _nested(combo)), seed)
    if not erase_recover:  # the grid may set attack.config.* over the attack's own config
        exp["attack"] = _merge(_attack_with_seed(stage, seed), exp.get("attack", {}))
    if not fp["existing"]:
        fp = {**fp, "config": {**fp["config"], "seed": seed}}
    Experiment.from_dict({**exp, "model": model, "fingerprint": fp},
                         where=f"{where}experiment/grid {json.dumps(combo) if combo else ''}: ")
    label = "__".join([_slug(Path(model).name), _fingerprint_label(fp), _slug(attack["method"]), f"s{seed}",
                       *(_slug(f"{k}={v}") for k, v in combo.items())])
    return Cell(f"{label}__{_hash([model, fp, stage, seed, exp])[:8]}", model, fp, stage, seed, combo, exp)


def check_models(matrix: Matrix, where: str = "") -> None:
    """Refuse a model that does not exist before any cell runs: a missing folder, or a hub id that is neither in
    the local cache (offline) nor on the hub."""
    import os

    from meraser.models import ALIASES, check_model_spec

    for i, spec in enumerate(matrix.models):
        at = f"{where}models[{i}]"
        check_model_spec(spec, at)
        if spec in ALIASES or Path(spec).exists():
            continue
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(spec, "config.json"), str):
            continue
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise MeraserError(f"{at}: model '{spec}' is not a folder, an alias or a model in the local Hugging Face "
                               f"cache (offline){did_you_mean(spec, sorted(ALIASES))}")
        try:
            from huggingface_hub import model_info

            model_info(spec)
        except Exception as e:  # not found, gated, no network
            raise MeraserError(f"{at}: model '{spec}' is not a folder and cannot be found on the Hugging Face hub "
                               f"({type(e).__name__})") from None


def load_matrix(path: str | Path) -> Matrix:
    return Matrix.from_dict(load_yaml(path), where=f"{path}: ")


def shared_root(matrix: Matrix) -> Path:
    """Where the matrix keeps what cells share (absolute: cells may run in other processes or on other machines)."""
    return Path(matrix.shared or matrix.out).resolve()


def _fingerprint_folder(share: Path, cell: Cell) -> Path:
    return share / "fingerprints" / f"{_slug(Path(cell.model).name)}__{_fingerprint_label(cell.fingerprint)}__s{cell.seed}"


MADE = "made.jsonl"  # in the shared folder: what prepare_shared made, and its wall time (a matrix's shared work)


def prepare_shared(cells: list[Cell], share: Path, console=None) -> None:
    """Make what several cells share, once: each fingerprinted model, and MEraser's transfer adapter where a cell
    asks for `meraser-transfer` without one. Both are written atomically, so a finished one is simply reused."""
    from meraser.fingerprints.embed import fingerprint

    for cell in cells:
        folder = _fingerprint_folder(share, cell)
        if not cell.fingerprint["existing"] and folder.exists():
            _check_fingerprint_folder(folder, cell)
        if not cell.fingerprint["existing"] and not folder.exists():
            if console:
                console.print(f"fingerprinting {cell.model} with {cell.fingerprint['method']} (seed {cell.seed})")
            _timed(share, "fingerprinted model", folder,
                   lambda: fingerprint(cell.fingerprint["method"], cell.model, folder, cell.fingerprint["config"]))
        kind, folder = _shared(share, cell)
        if kind and not folder.exists():
            if console:
                console.print(f"making the shared {kind} for {cell.model} (seed {cell.seed})")
            _timed(share, kind, folder, lambda: _make_shared(kind, cell, folder))


def _fingerprint_changes(folder: Path, cell: Cell) -> str | None:
    """What differs between the settings a shared fingerprinted model was made with and those the cell resolves to
    today; None when they agree or nothing was recorded (made elsewhere and copied in)."""
    from meraser.fingerprints import get_method
    from meraser.utils import changes

    summary = folder / "fingerprint_summary.json"
    if not summary.is_file():
        return None
    made = json.loads(summary.read_text()).get("config")
    config = get_method(cell.fingerprint["method"]).Config
    wanted = config.from_dict(cell.fingerprint["config"]).to_dict()
    if made is not None:
        with contextlib.suppress(MeraserError):  # a field added since, at its default, is what was made before it
            made = config.from_dict(made).to_dict()
    return changes(made, wanted) if made is not None and made != wanted else None


def _check_fingerprint_folder(folder: Path, cell: Cell) -> None:
    """A shared fingerprinted model is named by the matrix's settings, not by the defaults under them: refuse one
    made with other settings (a default changed since), rather than attack it under the new settings' name."""
    diff = _fingerprint_changes(folder, cell)
    if diff:
        raise MeraserError(f"{folder}: this shared fingerprinted model was made with other settings "
                           f"({diff}); a default has changed since. Move the folder away to "
                           f"make it again (and the cells on it: their ids name it), or give the old settings in "
                           f"the matrix's fingerprint config")


def stale_cells(cells: list[Cell], done: set[str], out: Path, share: Path) -> dict[str, str]:
    """Finished cells that today's meraser would not make the same way: a cell's id hashes the matrix as written,
    not the defaults under it, so a default changed since (a fingerprint's, a training's, an evaluation's) leaves
    the id alone. Each finished cell is planned again as the runner would and its stage identities compared with
    those its folder recorded; returns {cell id: what changed}. A cell whose folder or fingerprint is gone cannot
    be compared and is left as done."""
    stale = {}
    for cell in cells:
        if cell.id in done:
            reason = _stale_reason(cell, out, share)
            if reason:
                stale[cell.id] = reason
    return stale


def _stale_reason(cell: Cell, out: Path, share: Path) -> str | None:
    from meraser.runner import STAGE_RECORD, Experiment, plan_experiment
    from meraser.utils import changes

    if not cell.fingerprint["existing"]:
        folder = _fingerprint_folder(share, cell)
        if not folder.exists():
            return None
        diff = _fingerprint_changes(folder, cell)
        if diff:
            return f"its shared fingerprinted model was made with other settings ({diff})"
    record = out / "cells" / cell.id / STAGE_RECORD
    if not record.is_file():
        return None
    try:
        plan = plan_experiment(Experiment.from_dict(cell_experiment(cell, out, share)), where=f"cell {cell.id}: ")
    except MeraserError:
        return None  # it cannot be planned today (a model gone): nothing to compare with
    made = read_json(record, "stage record")
    for name, stage in plan.stages.items():
        if name in made and made[name].get("id") != stage.id:
            return f"stage '{name}': {changes(made[name].get('settings'), stage.settings)}"
    return None


def _make_shared(kind: str, cell: Cell, folder: Path) -> None:
    if kind == "transfer adapter":  # a bench killed while training it continues where it stopped
        from meraser.erase.transfer import transfer_train

        transfer_train(cell.model, folder, resume="auto", progress=False)
        return
    from meraser.attacks import get_attack
    from meraser.attacks.merge import make_expert

    a = cell.experiment["attack"]
    cfg = get_attack(a["method"]).Config.from_dict(a["config"])
    with atomic_dir(folder) as tmp:
        make_expert(cell.model, cfg, tmp, progress=False)


def _timed(share: Path, what: str, folder: Path, make) -> None:
    t0 = time.perf_counter()
    make()
    append_jsonl(share / MADE, {"what": what, "folder": folder.name, "seconds": round(time.perf_counter() - t0, 1)})


def shared_work(matrix: Matrix, cells: list[Cell]) -> tuple[float, list[str]]:
    """The wall time of the shared work `cells` use (fingerprinted models, transfer adapters, merge experts), and
    the folders whose time was not recorded (made before meraser logged it, or by hand)."""
    share = shared_root(matrix)
    made = {r["folder"]: r["seconds"] for r in read_jsonl(share / MADE, "shared-work log", torn_tail_ok=True)}
    folders = {_fingerprint_folder(share, c) for c in cells if not c.fingerprint["existing"]}
    folders |= {f for c in cells for k, f in [_shared(share, c)] if k}
    seconds, unknown = 0.0, []
    for f in sorted(folders):
        summary = f / "fingerprint_summary.json"  # a fingerprinted model records its own time
        t = made.get(f.name)
        if t is None and summary.is_file():
            t = json.loads(summary.read_text()).get("seconds")
        if t is None:
            unknown.append(f.name)
        else:
            seconds += t
    return seconds, unknown


def _shared(share: Path, cell: Cell) -> tuple[str | None, Path | None]:
    """What a cell's attack needs that other cells share: MEraser's transfer adapter (per model and seed), or a
    merge's expert (per model and expert settings); (None, None) when it needs nothing shared."""
    a = cell.experiment.get("attack")
    model = _slug(Path(cell.model).name)
    if a and a["method"] == "meraser-transfer" and not a["config"].get("adapter"):
        return "transfer adapter", share / "shared" / f"transfer__{model}__s{cell.seed}"
    if a and a["method"].startswith("merge-") and not a["config"].get("expert"):
        keys = ("expert_data", "expert_rows", "expert_train", "seed")
        settings = {k: a["config"].get(k) for k in keys}
        return "merge expert", share / "shared" / f"expert__{model}__{_hash(settings)[:8]}"
    return None, None



def cell_experiment(cell: Cell, out: Path, share: Path | None = None) -> dict:
    """The experiment a cell runs: its settings, its folder, the shared fingerprinted model and adapter."""
    share = share or out
    exp = copy.deepcopy(cell.experiment)
    fp = cell.fingerprint if cell.fingerprint["existing"] else {"existing": str(_fingerprint_folder(share, cell))}
    kind, folder = _shared(share, cell)
    if kind:
        exp["attack"]["config"]["adapter" if kind == "transfer adapter" else "expert"] = str(folder)
    return {**exp, "model": cell.model, "out": str(out / "cells" / cell.id), "fingerprint": fp}


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


def run_cell(cell: Cell, out: Path, share: Path | None = None, overwrite: bool = False) -> list[dict]:
    """Run (or finish) one cell's experiment; its rows for the store, each with the cell's settings and costs.
    `overwrite`: redo the stages its folder made under other settings (a stale cell run again)."""
    from meraser.runner import Experiment, run_experiment

    share = share or out
    exp = cell_experiment(cell, out, share)
    t0 = time.perf_counter()
    with PeakMemory() as mem:
        rows = run_experiment(Experiment.from_dict(exp, where=f"cell {cell.id}: "), progress=False,
                              shared=share / "shared", overwrite=overwrite)
    meta = {"cell": cell.id, "model": cell.model, "fingerprint": _fingerprint_label(cell.fingerprint),
            "attack": cell.attack["method"], "seed": cell.seed, "grid": cell.grid, "settings": exp,
            "versions": versions(), "cell_seconds": round(time.perf_counter() - t0, 1),
            "peak_rss_mb": round(mem.peak / 2**20), "rss_at_start_mb": round(mem.start / 2**20)}
    return [{**meta, **row} for row in rows]


def finished_cells(out: Path) -> set[str]:
    return {r["cell"] for r in read_jsonl(Path(out) / RESULTS, "results store", torn_tail_ok=True)}


def record(out: Path, rows: list[dict], replace: bool = False) -> None:
    """Add a finished cell's rows to the store in one atomic replace: all of them, or (killed) none. `replace`: they
    supersede the cell's stored rows (a re-verified cell)."""
    from meraser.utils import write_jsonl

    stored = read_jsonl(out / RESULTS, "results store", torn_tail_ok=True)
    cells = {r["cell"] for r in rows} if replace else set()
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
              redo_stale: bool = False, reverify: bool = False) -> dict:
    """Check the whole matrix, then run every cell not yet in the store (with `only`, those whose id contains one
    of its strings). A finished cell that today's defaults would make differently (`stale_cells`) is refused,
    naming what changed, unless `redo_stale`: then its rows leave the store and it runs again. With `reverify`, a
    finished cell whose rows predate a registered verification runs again too: its stored models (made again where
    not kept) get just the missing verifications, and its rows are replaced by the completed ones. Returns {cells,
    done, ran, failed, stale, reverified}; with `dry_run`, only lists the cells and what is done or stale."""
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
                          reverify)
    with exclusive(out, "bench folder"), (exclusive(share, "shared folder") if share != out else nullcontext()):
        return _run_bench(matrix, cells, out, share, where, False, only, progress, console, executor, redo_stale,
                          reverify)


def _run_bench(matrix: Matrix, cells: list[Cell], out: Path, share: Path, where: str, dry_run: bool,
               only: list[str] | None, progress: bool, console, executor: Executor, redo_stale: bool,
               reverify: bool = False) -> dict:
    """`run_bench` once its inputs are checked and (unless `dry_run`) its folders locked."""
    done = finished_cells(out)
    wanted = [c for c in cells if not only or any(o in c.id for o in only)]
    if not wanted:
        raise MeraserError(f"{where}--only {' '.join(only)}: no cell id contains it (ids look like "
                           f"{cells[0].id})")
    stale = stale_cells(wanted, done, out, share)
    if console:
        console.print(cells_table(cells, done, stale))
    if stale and not dry_run:
        _settle_stale(stale, out, done, redo_stale, where)
    again = unverified_cells(out, {c.id for c in wanted} & done) if reverify else set()
    todo = [c for c in wanted if c.id not in done or c.id in again]
    n_done = sum(c.id in done for c in cells)
    if dry_run or not todo:
        return {"cells": len(cells), "done": n_done, "ran": 0, "failed": [], "stale": sorted(stale),
                "reverified": 0 if not dry_run else len(again)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "matrix.json", matrix.to_dict())
    prepare_shared(todo, share, console)
    failed: list[str] = []

    def finished(cell: Cell, rows: list[dict] | None, error: BaseException | None) -> None:
        """The driver alone writes the store (and the failure log), whichever executor ran the cell."""
        if error is None:
            record(out, rows, replace=cell.id in again)
            if not matrix.keep_models:
                drop_attacked_model(out / "cells" / cell.id)
            return
        failed.append(cell.id)  # one broken cell must not stop the matrix; it is retried on the next run
        import traceback

        where_ = "".join(traceback.format_tb(error.__traceback__)[-3:]) if error.__traceback__ else ""
        append_jsonl(out / FAILED, {"cell": cell.id, "error": f"{type(error).__name__}: {error}"[:2000],
                                    "traceback": where_[-3000:], "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if console:
            console.print(f"[red]cell {cell.id} failed[/]: {type(error).__name__}: {str(error)[:300]}")

    with progress_bar(progress) as bar:
        task = bar.add_task("matrix", total=n_done - len(again) + len(todo), completed=n_done - len(again))
        redo = set(stale) if redo_stale else set()

        def done(cell, rows, error):
            finished(cell, rows, error)
            bar.advance(task)

        if executor.kind == "ray":
            _run_on_ray(todo, out, share, executor, done, redo=redo)
        else:  # one cell at a time: the bar names the cell that runs (its own steps show no bar inside the bench's)
            _run_here(todo, out, share, done, redo=redo,
                      started=lambda cell: bar.update(task, description=f"matrix: {_cell_label(cell)}"))
    return {"cells": len(cells), "done": n_done, "ran": len(todo) - len(again) - len(set(failed) - again),
            "failed": failed, "stale": sorted(stale) if not redo_stale else [],
            "reverified": len(again - set(failed))}


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
        card = existing_card(fp["existing"] or str(_fingerprint_folder(share, cell)), fp.get("card"))
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
    return f"{_fingerprint_label(cell.fingerprint)} x {cell.attack['method']}" + (f" ({setting})" if setting else "")


def _run_here(cells: list[Cell], out: Path, share: Path, finished, redo: set[str], started=None) -> None:
    for cell in cells:
        if started:
            started(cell)
        try:
            rows = run_cell(cell, out, share, cell.id in redo)
        except Exception as e:
            finished(cell, None, e)
        else:
            finished(cell, rows, None)


def _run_on_ray(cells: list[Cell], out: Path, share: Path, executor: Executor, finished, redo: set[str]) -> None:
    """Each cell a Ray task with the CPUs/GPUs it asks for; results come back to the driver as they finish."""
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=executor.address, include_dashboard=False, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=executor.cpus_per_cell, num_gpus=executor.gpus_per_cell, max_retries=0)(run_cell)
        pending = {task.remote(cell, out, share, cell.id in redo): cell for cell in cells}
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


def describe(cell: Cell) -> str:
    """A cell's own settings in one line: the attack's config (dotted) and the grid values, a grid over the attack's
    config named as the config itself is (`weights=...`, set either way)."""
    from meraser.utils import flat_keys

    grid = {k.removeprefix("attack.config."): v for k, v in cell.grid.items()}
    return " ".join(f"{k}={v}" for k, v in {**flat_keys(cell.attack["config"]), **grid}.items() if not k.endswith("seed"))


def cells_table(cells: list[Cell], done: set[str], stale: dict[str, str] | None = None):
    """The matrix's cells and each one's status: done, stale (done under other settings: what changed), to run."""
    from rich.table import Table

    stale = stale or {}
    title = f"{len(cells)} cells, {sum(c.id in done for c in cells)} done" + (f", {len(stale)} stale" if stale else "")
    table = Table(title=title)
    for h in ("model", "fingerprint", "attack", "seed", "settings", "status"):
        table.add_column(h)
    for c in cells:
        table.add_row(Path(c.model).name, _fingerprint_label(c.fingerprint), c.attack["method"], str(c.seed),
                      describe(c), f"stale: {stale[c.id]}" if c.id in stale else "done" if c.id in done else "to run")
    return table
