"""The attack interface: a typed config and `apply(model, tokenizer, cfg, ctx) -> model`.

Every attack, MEraser included, takes a fingerprinted model and returns the attacked one, in memory. What an attack
needs beyond the model (the base it derives from, data, an expert, a folder for intermediate work) comes in the
context, and what it wants reported (heads removed, sparsity reached, rows used) goes into `ctx.info`.
`run_attack` is `meraser attack`: check every input, load, apply, save a normal model folder. A decoding-time
attack (attacks/decoding.py) changes no weight: it returns a `generation.Decoding` instead, and its folder holds only
its record (`attack.json`) and the files it made, which `decoding_attack` reads back.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import ClassVar

from meraser.config import Config


@dataclass
class AttackConfig(Config):
    """Base class of every attack's config (a dataclass; fields carry a default and a help line)."""


@dataclass
class AttackContext:
    model_spec: str  # the attacked model, as given
    base: str | None  # the base model it derives from (merging, transfer), if known
    work: Path  # a private folder for intermediate results (experts, adapters); removed after success
    progress: bool = True
    info: dict = dc_field(default_factory=dict)  # what the attack reports about itself
    files: dict = dc_field(default_factory=dict)  # {name: text} written beside the result (extracted sequences)

    def need_base(self, attack: str) -> str:
        from meraser.utils import MeraserError

        if not self.base:
            raise MeraserError(f"{attack} needs the base model the attacked model derives from: pass --base (or "
                               f"`base` in the experiment); none is recorded with the model")
        return self.base


class Attack:
    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `meraser attack --help`
    paper: ClassVar[str]  # where the method comes from
    Config: ClassVar[type[AttackConfig]]

    def check(self, cfg, ctx: AttackContext) -> None:
        """Refuse bad inputs before the model loads (sources, expert specs); the config itself is typed already."""

    def apply(self, model, tokenizer, cfg, ctx: AttackContext):
        raise NotImplementedError

    def scored(self, ctx: AttackContext, card) -> dict:
        """What the attack's own findings score against the card, where an experiment holds one (find-and-unlearn's
        discovery recall): for the report only, after the attack, which never sees the card."""
        return {}


ATTACK_RECORD = "attack.json"  # what a decoding attack's folder holds instead of a model


def is_decoding(attack: Attack) -> bool:
    return callable(getattr(attack, "decoding", None))


def recorded_base(model_spec: str) -> str | None:
    """The base a model folder records (meraser writes it when fingerprinting or training), else None."""
    from meraser.models import MERASER_META
    from meraser.utils import read_json

    meta = Path(model_spec, MERASER_META)
    if not meta.is_file():
        return None
    rec = read_json(meta, "model record")
    return rec.get("base") or rec.get("source")


def run_attack(method: str, model: str, out: str | Path, overrides: dict | None = None, *, base: str | None = None,
               overwrite: bool = False, progress: bool = True, trust_remote_code: bool = False) -> dict:
    """`meraser attack`: apply a registered attack to `model` and save the result to `out` as a model folder that
    `verify`, `evaluate` and `chat` load unchanged. Returns a summary (settings, what the attack reports, time)."""
    import shutil

    from meraser.attacks import get_attack
    from meraser.models import check_model_spec, input_folders, load_model, save_model
    from meraser.utils import check_output_dir

    attack = get_attack(method)
    cfg = attack.Config.from_dict(overrides or {}, where=f"{method} settings")
    out = check_output_dir(out, overwrite, input_folders(model, "model") + input_folders(base, "base model")
                           + input_folders(getattr(cfg, "adapter", None), "adapter")
                           + input_folders(getattr(cfg, "expert", None), "expert model"))
    check_model_spec(model, "--model")
    ctx = AttackContext(model, base or recorded_base(model), out.parent / f".{out.name}.attack", progress)
    attack.check(cfg, ctx)
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    if is_decoding(attack):
        return _run_decoding_attack(attack, m, tok, cfg, ctx, out, overwrite)
    t0 = time.perf_counter()
    attacked = apply_attack(attack, m, tok, cfg, ctx)
    seconds = round(time.perf_counter() - t0, 1)
    summary = {"attack": method, "config": cfg.to_dict(), "base": ctx.base, "seconds": seconds, **ctx.info}
    attacked._meraser_spec = model
    save_model(attacked, tok, out, overwrite=overwrite, meta=summary, extra_files=ctx.files)
    shutil.rmtree(ctx.work, ignore_errors=True)
    return {**summary, "out": str(out)}


def _run_decoding_attack(attack, model, tokenizer, cfg, ctx: AttackContext, out: Path, overwrite: bool) -> dict:
    """Prepare the decoding (Token Forcing scans here) and write its record; no model is written."""
    t0 = time.perf_counter()
    attack.decoding(model, tokenizer, cfg, ctx)
    summary = {"attack": attack.name, "config": cfg.to_dict(), "model": ctx.model_spec, "base": ctx.base,
               "seconds": round(time.perf_counter() - t0, 1), **ctx.info}
    write_attack_record(out, summary, ctx.files, overwrite)
    return {**summary, "out": str(out)}


def write_attack_record(out: Path, summary: dict, files: dict, overwrite: bool) -> None:
    import json

    from meraser.utils import atomic_dir, atomic_write_text

    with atomic_dir(out, overwrite=overwrite) as tmp:  # owner-only files: extracted sequences may quote a target
        atomic_write_text(tmp / ATTACK_RECORD, json.dumps(summary, indent=2, ensure_ascii=False))
        for name, text in files.items():
            atomic_write_text(tmp / name, text)


def prepare_decoding(method: str, overrides: dict | None, model_spec: str, *, base: str | None = None,
                     progress: bool = False):
    """Check a decoding-time attack and its settings before any model loads: (attack, cfg, ctx)."""
    from meraser.attacks import get_attack
    from meraser.utils import MeraserError

    attack = get_attack(method)
    if not is_decoding(attack):
        raise MeraserError(f"{method} changes weights, not decoding: run `meraser attack --method {method}` and "
                           f"check the model it writes")
    cfg = attack.Config.from_dict(overrides or {}, where=f"{method} settings")
    ctx = AttackContext(model_spec, base or recorded_base(model_spec), Path(".unused"), progress)
    attack.check(cfg, ctx)
    return attack, cfg, ctx


def decoding_attack(method: str, overrides: dict | None, model, tokenizer, model_spec: str, *,
                    base: str | None = None, progress: bool = False):
    """The decoding strategy of a decoding-time attack, for `verify`, `chat` and evaluation: (decoding, info).
    Token Forcing reuses an earlier scan with `sequences=DIR/extracted.jsonl`; without it, it scans now."""
    attack, cfg, ctx = prepare_decoding(method, overrides, model_spec, base=base, progress=progress)
    return attack.decoding(model, tokenizer, cfg, ctx), ctx.info


def apply_attack(attack: Attack, model, tokenizer, cfg, ctx: AttackContext):
    """Apply in memory (the experiment runner's stage calls this too)."""
    ctx.work.mkdir(parents=True, exist_ok=True)
    model = attack.apply(model, tokenizer, cfg, ctx)
    model.eval()
    return model
