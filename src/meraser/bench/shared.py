"""What cells share, made once before them: fingerprinted models, MEraser's transfer adapter, merge experts (in the
matrix's `shared` folder); which finished cells today's defaults would make differently (stale); and a cell's
experiment with its shared parts filled in."""

from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

from meraser.bench.plan import Cell, Matrix, fingerprint_label, settings_hash, slug
from meraser.utils import MeraserError, append_jsonl, atomic_dir, read_json, read_jsonl


def shared_root(matrix: Matrix) -> Path:
    """Where the matrix keeps what cells share (absolute: cells may run in other processes or on other machines)."""
    return Path(matrix.shared or matrix.out).resolve()


def fingerprint_folder(share: Path, cell: Cell) -> Path:
    return share / "fingerprints" / f"{slug(Path(cell.model).name)}__{fingerprint_label(cell.fingerprint)}__s{cell.seed}"


MADE = "made.jsonl"  # in the shared folder: what prepare_shared made, and its wall time (a matrix's shared work)


def prepare_shared(cells: list[Cell], share: Path, console=None, progress: bool = False) -> None:
    """Make what several cells share, once: each fingerprinted model, and MEraser's transfer adapter where a cell
    asks for `meraser-transfer` without one. Both are written atomically, so a finished one is simply reused.
    `progress`: their own bars (this runs before the bench's bar starts; on Gemma each takes minutes)."""
    from meraser.fingerprints.embed import fingerprint

    for cell in cells:
        folder = fingerprint_folder(share, cell)
        if not cell.fingerprint["existing"] and folder.exists():
            _check_fingerprint_folder(folder, cell)
        if not cell.fingerprint["existing"] and not folder.exists():
            if console:
                console.print(f"fingerprinting {cell.model} with {cell.fingerprint['method']} (seed {cell.seed})")
            _timed(share, "fingerprinted model", folder,
                   lambda: fingerprint(cell.fingerprint["method"], cell.model, folder, cell.fingerprint["config"],
                                       progress=progress))
        kind, folder = shared_parts(share, cell)
        if kind and not folder.exists():
            if console:
                console.print(f"making the shared {kind} for {cell.model} (seed {cell.seed})")
            _timed(share, kind, folder, lambda: _make_shared(kind, cell, folder, progress))


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
        folder = fingerprint_folder(share, cell)
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
        if name in made and not stage.made_by(made[name]):
            return f"stage '{name}': {changes(made[name].get('settings'), stage.settings)}"
    return None


def _make_shared(kind: str, cell: Cell, folder: Path, progress: bool) -> None:
    if kind == "transfer adapter":  # a bench killed while training it continues where it stopped
        from meraser.erase.transfer import transfer_train

        transfer_train(cell.model, folder, resume="auto", progress=progress)
        return
    from meraser.attacks import get_attack
    from meraser.attacks.merge import make_expert

    a = cell.experiment["attack"]
    cfg = get_attack(a["method"]).Config.from_dict(a["config"])
    with atomic_dir(folder) as tmp:
        make_expert(cell.model, cfg, tmp, progress=progress)


def _timed(share: Path, what: str, folder: Path, make) -> None:
    t0 = time.perf_counter()
    make()
    append_jsonl(share / MADE, {"what": what, "folder": folder.name, "seconds": round(time.perf_counter() - t0, 1)})


def shared_work(matrix: Matrix, cells: list[Cell]) -> tuple[float, list[str]]:
    """The wall time of the shared work `cells` use (fingerprinted models, transfer adapters, merge experts), and
    the folders whose time was not recorded (made before meraser logged it, or by hand)."""
    share = shared_root(matrix)
    made = {r["folder"]: r["seconds"] for r in read_jsonl(share / MADE, "shared-work log", torn_tail_ok=True)}
    folders = {fingerprint_folder(share, c) for c in cells if not c.fingerprint["existing"]}
    folders |= {f for c in cells for k, f in [shared_parts(share, c)] if k}
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


def shared_parts(share: Path, cell: Cell) -> tuple[str | None, Path | None]:
    """What a cell's attack needs that other cells share: MEraser's transfer adapter (per model and seed), or a
    merge's expert (per model and expert settings); (None, None) when it needs nothing shared."""
    a = cell.experiment.get("attack")
    model = slug(Path(cell.model).name)
    if a and a["method"] == "meraser-transfer" and not a["config"].get("adapter"):
        return "transfer adapter", share / "shared" / f"transfer__{model}__s{cell.seed}"
    if a and a["method"].startswith("merge-") and not a["config"].get("expert"):
        keys = ("expert_data", "expert_rows", "expert_train", "seed")
        settings = {k: a["config"].get(k) for k in keys}
        return "merge expert", share / "shared" / f"expert__{model}__{settings_hash(settings)[:8]}"
    return None, None



def cell_experiment(cell: Cell, out: Path, share: Path | None = None) -> dict:
    """The experiment a cell runs: its settings, its folder, the shared fingerprinted model and adapter."""
    share = share or out
    exp = copy.deepcopy(cell.experiment)
    fp = cell.fingerprint if cell.fingerprint["existing"] else {"existing": str(fingerprint_folder(share, cell))}
    kind, folder = shared_parts(share, cell)
    if kind:
        exp["attack"]["config"]["adapter" if kind == "transfer adapter" else "expert"] = str(folder)
    return {**exp, "model": cell.model, "out": str(out / "cells" / cell.id), "fingerprint": fp}


