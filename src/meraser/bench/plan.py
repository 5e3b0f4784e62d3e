"""A matrix and its cells: the YAML's models x fingerprints x attacks x seeds x grid, each cell an experiment's
settings with a readable, unique id; and the dry-run table of them."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

from meraser.config import Config, field, key_path, load_yaml
from meraser.models import DEFAULT_MODEL
from meraser.utils import MeraserError, did_you_mean

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
                                                               "{method, config} to make, or {existing, card}; "
                                                               "`attacks: [...]` beside them runs only those of "
                                                               "the matrix's attacks on it (written as listed)")
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

    @property
    def hash(self) -> str:
        """The id's last part, the settings hash: what `--only` is given to pick one cell."""
        return self.id.rsplit("__", 1)[-1]


def slug(text: str) -> str:
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


def fingerprint_label(fp: dict) -> str:
    if fp.get("existing"):
        return slug(Path(fp["existing"]).name)
    return slug(fp.get("method", "utf")) + ("-" + settings_hash(fp["config"])[:6] if fp.get("config") else "")


def settings_hash(obj) -> str:
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

    attacks = [_attack(a, f"{where}attacks[{i}]") for i, a in enumerate(matrix.attacks)]
    fps, picks = [], []
    for i, entry in enumerate(matrix.fingerprints):
        at = f"{where}fingerprints[{i}]"
        fp = dict(entry) if isinstance(entry, dict) else entry
        only = fp.pop("attacks", None) if isinstance(fp, dict) else None  # the cells' settings never include it
        fps.append(FingerprintStage.from_dict(fp, where=at).to_dict())
        picks.append(attacks if only is None else _picked_attacks(only, attacks, key_path(at, "attacks")))
    for name, items in [("models", matrix.models), ("fingerprints", fps), ("attacks", attacks),
                        ("seeds", matrix.seeds)]:
        _no_duplicates(items, where, name)
    cells = []
    for model, (fp, picked) in itertools.product(matrix.models, zip(fps, picks)):
        for attack, seed in itertools.product(picked, matrix.seeds):
            grid = {**matrix.grid, **attack["grid"]}
            for values in itertools.product(*grid.values()):
                cells.append(_cell(matrix, model, fp, attack, seed, dict(zip(grid, values)), where))
    ids: dict[str, Cell] = {}
    for cell in cells:  # what the lists above cannot show (a grid value that repeats an attack's own setting)
        if cell.id in ids:
            raise MeraserError(f"{where}two entries plan the same cell {cell.id}; list each setting once")
        ids[cell.id] = cell
    return cells


def _picked_attacks(only, attacks: list[dict], where: str) -> list[dict]:
    """A fingerprint's `attacks:`: a subset of the matrix's attacks, each written as in `attacks:` (a name alone
    picks the entry with no config), so a planting that cannot show an effect does not get every cell."""
    if not isinstance(only, list) or not only:
        raise MeraserError(f"{where}: a non-empty list of the matrix's attacks, as written under `attacks:`")
    picked = [_attack(a, f"{where}[{j}]") for j, a in enumerate(only)]
    _no_duplicates(picked, f"{where}", "")
    for j, a in enumerate(picked):
        if a not in attacks:
            listed = [json.dumps({k: v for k, v in b.items() if v}, default=str) for b in attacks
                      if b["method"] == a["method"]]
            raise MeraserError(f"{where}[{j}]: {json.dumps(only[j], default=str)} is not one of the matrix's "
                               f"attacks" + (f" (with that method: {', '.join(listed)})" if listed else ""))
    return [a for a in attacks if a in picked]  # the matrix's order


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
    label = "__".join([slug(Path(model).name), fingerprint_label(fp), slug(attack["method"]), f"s{seed}",
                       *(slug(f"{k}={v}") for k, v in combo.items())])
    return Cell(f"{label}__{settings_hash([model, fp, stage, seed, exp])[:8]}", model, fp, stage, seed, combo, exp)


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


def describe(cell: Cell) -> str:
    """A cell's own settings in one line: the attack's config (dotted) and the grid values, a grid over the attack's
    config named as the config itself is (`weights=...`, set either way)."""
    from meraser.utils import flat_keys

    grid = {k.removeprefix("attack.config."): v for k, v in cell.grid.items()}
    return " ".join(f"{k}={v}" for k, v in {**flat_keys(cell.attack["config"]), **grid}.items() if not k.endswith("seed"))


def cells_table(cells: list[Cell], done: set[str], stale: dict[str, str] | None = None,
                shown: list[Cell] | None = None):
    """The matrix's cells and each one's status: done, stale (done under other settings: what changed), to run.
    With `shown` (the cells `--only` picked), only those rows; the id column is what `--only` matches."""
    from rich.table import Table

    stale, shown = stale or {}, cells if shown is None else shown
    title = f"{len(cells)} cells, {sum(c.id in done for c in cells)} done" + (f", {len(stale)} stale" if stale else "")
    if len(shown) < len(cells):
        title = f"{len(shown)} of {title} (--only)"
    table = Table(title=title)
    for h in ("id", "model", "fingerprint", "attack", "seed", "settings", "status"):
        table.add_column(h)
    for c in shown:
        table.add_row(c.hash, Path(c.model).name, fingerprint_label(c.fingerprint),
                      c.attack["method"], str(c.seed), describe(c),
                      f"stale: {stale[c.id]}" if c.id in stale else "done" if c.id in done else "to run")
    return table
