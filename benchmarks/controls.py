"""Control models for the benchmarks that test cards on models that never saw them (likelihood_calibration.py,
false_positives.py): listed in YAML as `name: {model, attack | fingerprint, set, base, made_by, family}`, built with
meraser's own library calls (`run_attack`, `fingerprint`), each once into its folder (a rerun reuses it). A control
may be built from one listed before it (`model: control:NAME`, also inside `set`); `made_by` names the command that
makes a model this file only points at; `family` marks a model of another family than the cards' base (for a
non-invasive card, the only true negatives).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

CONTROL_KEYS = {"model", "attack", "fingerprint", "set", "base", "made_by", "family"}


def read_config(path: str, top_keys: set[str]) -> dict:
    """A benchmark's YAML with a `controls` section: unknown top-level keys and control keys refused."""
    import yaml

    from meraser.utils import unknown_name

    cfg = yaml.safe_load(Path(path).read_text())
    for key in cfg:
        if key not in top_keys:
            raise unknown_name("key", key, top_keys, path)
    check_controls(cfg["controls"], path)
    return cfg


def check_controls(controls: dict, where: str) -> None:
    """Refuse unknown keys and a control that is both an attack and a fingerprint."""
    from meraser.utils import MeraserError, unknown_name

    for name, spec in controls.items():
        for key in spec:
            if key not in CONTROL_KEYS:
                raise unknown_name("control key", key, CONTROL_KEYS, f"{where}: controls.{name}")
        if "attack" in spec and "fingerprint" in spec:
            raise MeraserError(f"{where}: controls.{name}: an attack or a fingerprint, not both")


def build_controls(controls: dict, folder: Path) -> dict[str, str]:
    """Every control's model (an id, alias or folder), in the listed order, building the ones not built yet."""
    models: dict[str, str] = {}  # in order: a control may be built from one listed before it
    for name, spec in controls.items():
        models[name] = _build(name, spec, folder, models)
    return models


def group(spec: dict) -> str:
    """What kind of control: fingerprinted with another key, a sibling (fine-tune), a merge, a prune, the base."""
    if "fingerprint" in spec or "made_by" in spec:
        return "fingerprinted, other key"
    attack = spec.get("attack", "")
    return {"finetune": "sibling"}.get(attack) or attack.split("-")[0] or "base"


def _resolve(value, models: dict[str, str]):
    """'control:NAME' -> the model of control NAME (listed before: a control built from another)."""
    from meraser.utils import unknown_name

    if isinstance(value, str) and value.startswith("control:"):
        name = value.removeprefix("control:")
        if name not in models:
            raise unknown_name("control (listed before this one)", name, models)
        return models[name]
    if isinstance(value, dict):
        return {k: _resolve(v, models) for k, v in value.items()}
    return value


def _build(name: str, spec: dict, folder: Path, models: dict[str, str]) -> str:
    from meraser.utils import MeraserError

    model, target = _resolve(spec["model"], models), folder / name
    if "attack" not in spec and "fingerprint" not in spec:
        if ("/" in model or model.startswith(".")) and not Path(model).exists():
            raise MeraserError(f"control {name}: {model} does not exist; make it with: {spec.get('made_by', '?')}")
        return model
    if (target / "built.json").exists():
        return str(target / "model") if "fingerprint" in spec else str(target)
    t0 = time.perf_counter()
    print(f"building control {name} ...", flush=True)
    sets = _resolve(spec.get("set", {}), models)
    if "attack" in spec:
        from meraser.attacks import run_attack

        run_attack(spec["attack"], model, target, sets, base=_resolve(spec.get("base"), models), overwrite=True,
                   progress=True)
    else:
        from meraser.fingerprints.embed import fingerprint

        fingerprint(spec["fingerprint"], model, target, sets, overwrite=True)
    (target / "built.json").write_text(json.dumps({"spec": spec, "seconds": round(time.perf_counter() - t0)}))
    return str(target / "model") if "fingerprint" in spec else str(target)
