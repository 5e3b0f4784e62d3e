"""MEraser's two phases (paper section 4, Appendix B): erase on the mismatched set, recover on the clean set.

Erase: LoRA on the mismatched set (the paper's LoRA: `training.LoraSettings`' defaults). Recover: merge the erase
adapter, then LoRA on the clean set. The attacker knows nothing of the fingerprint: nothing here reads a card.
Both phases are `meraser.training.train` with a preset; `reference` reproduces the public reference code.
`erase_model` and `recover_model` are `meraser erase` / `meraser recover`: a model in, a model folder out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meraser.config import Config, field, key_path
from meraser.erase.datasets import CleanSet, MismatchedSet
from meraser.training import ALL_LINEAR, TrainConfig
from meraser.utils import MeraserError, unknown_name

# Only what differs from TrainConfig's defaults is written here; LoRA r/alpha/targets come from LoraSettings (the
# paper's r=16, alpha=32 on q_proj+v_proj) unless a preset says otherwise.
_PAPER_ERASE = {"epochs": 5, "learning_rate": 1e-3, "lr_scheduler": "constant"}
_PAPER_RECOVER = {"epochs": 2, "learning_rate": 2e-4, "lr_scheduler": "cosine"}
# the public reference code: raw question+answer text, loss over the whole sequence (its collator bug), batch 1
_REFERENCE = {"batch_size": 1, "format": {"template": "raw", "loss_on": "all"}}
# `paper` is the default, as the paper states it. `all-linear` puts the LoRA on every linear layer: measured on
# SmolLM2-135M it did not erase better and cost far more perplexity (README).
# `strong` trades perplexity for a deeper erase. Measured on SmolLM2-135M (README, "is the fingerprint erased"): of
# every blind recipe tried, only an erase at 3x the paper's learning rate stopped the target from following its
# own first tokens after recovery (forced prefix: IF-SFT 0% with 4 recovery epochs, 12.5% with 2; UTF 0% with 2;
# paper: 100%), at recovered perplexity 1.32-1.39x the base model's (paper: 1.13x); the target stays likelier than
# under the base model, so it is not erased strictly either.
ERASE_PRESETS = {
    "paper": _PAPER_ERASE,
    "all-linear": {**_PAPER_ERASE, "lora": {"target_modules": ALL_LINEAR}},
    "strong": {**_PAPER_ERASE, "learning_rate": 3e-3},
    # r=8, alpha=16, dropout 0.05, lr 5e-4 constant, warmup 0.1, clip 0.5
    "reference": {**_REFERENCE, "epochs": 5, "learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup",
                  "warmup_ratio": 0.1, "max_grad_norm": 0.5, "lora": {"r": 8, "alpha": 16, "dropout": 0.05}},
}
RECOVER_PRESETS = {
    "paper": _PAPER_RECOVER,
    "all-linear": {**_PAPER_RECOVER, "lora": {"target_modules": ALL_LINEAR}},
    "strong": {**_PAPER_RECOVER, "epochs": 4},
    "reference": {**_REFERENCE, "epochs": 2, "learning_rate": 5e-4, "lr_scheduler": "cosine"},
}
DEFAULT_PRESET = "paper"


def preset(kind: str, name: str = DEFAULT_PRESET, overrides: dict | None = None, where: str | None = None) -> TrainConfig:
    """The TrainConfig of an erase/recover preset with `overrides` on top (typed, unknown keys refused)."""
    table = ERASE_PRESETS if kind == "erase" else RECOVER_PRESETS
    if name not in table:
        raise unknown_name(f"{kind} preset", name, table)
    merged = json.loads(json.dumps(table[name]))
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    return TrainConfig.from_dict(merged, where=where or f"{kind} ({name})")


@dataclass
class Phase(Config):
    """One MEraser phase as an experiment or attack names it: a preset and TrainConfig fields over it."""

    preset: str = field(DEFAULT_PRESET, help="'paper' (the paper's LoRA on q/v), 'all-linear' (LoRA on every "
                                             "linear layer), 'strong' (erase at 3x the learning rate, recover 4 "
                                             "epochs) or 'reference' (the public code's settings)")
    overrides: dict = field({}, help="TrainConfig fields over the preset")

    def validate(self, where: str) -> None:
        if self.preset not in ERASE_PRESETS:  # erase and recover presets share their names
            raise unknown_name("preset", self.preset, ERASE_PRESETS, key_path(where, "preset"))

    def train_config(self, kind: str, where: str) -> TrainConfig:
        return preset(kind, self.preset, self.overrides, where=f"{key_path(where, 'overrides')}")


def erase(model, tokenizer, mismatched, cfg: TrainConfig, out, *, merge_out: bool = True, **kw):
    """Phase 1: LoRA on the mismatched pairs. Returns the TrainResult (model merged when `merge_out`)."""
    from meraser.training import train

    if cfg.method != "lora":
        raise MeraserError("MEraser erases with a LoRA adapter (method: lora)")
    return train(model, tokenizer, mismatched, cfg, out, merge=merge_out, **kw)


def recover(erased_model, tokenizer, clean, cfg: TrainConfig, out, *, merge_out: bool = True, **kw):
    """Phase 2: LoRA on the clean pairs, on top of the merged erased model."""
    from meraser.training import train

    return train(erased_model, tokenizer, clean, cfg, out, merge=merge_out, **kw)


# the rows a phase trained on, saved beside its model: recovery reads an erased model's rows to keep its clean set
# disjoint from them, and both are a record of what was done
MISMATCHED_FILE, CLEAN_FILE = "mismatched.jsonl", "clean.jsonl"


def _pairs_jsonl(pairs) -> str:
    return "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in pairs)


def _phase_model(kind: str, model: str, out, data, preset_name: str, overrides: dict | None, *, adapter: bool,
                 overwrite: bool, resume: bool, trust_remote_code: bool, progress: bool,
                 writer: str | None = None) -> dict:
    """Everything `meraser erase` and `meraser recover` share: check every input before loading anything, build
    the set, train, save a plain model folder (or the adapter alone)."""
    from meraser.models import check_model_spec, input_folders, load_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite, input_folders(model, "model") + input_folders(writer, "writer model")
                     + [("--data file", data.source)])
    check_model_spec(model, "--model")
    cfg = preset(kind, preset_name, overrides, where=f"{kind} preset '{preset_name}' with --set")
    data.check_inputs("--data")
    if writer:
        check_model_spec(writer, "--writer")
        if kind == "erase" or not data.needs_model:
            raise MeraserError("--writer names the model that writes --magpie or --self-answers recovery rows; "
                               "give one of those too")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    if kind == "erase":
        rows, _ = data.build()
        res = erase(m, tok, rows, cfg, out, merge_out=not adapter, overwrite=overwrite, resume=resume,
                    progress=progress, extra_files={MISMATCHED_FILE: _pairs_jsonl(rows)})
    else:
        from meraser.data import load_pairs

        seen = Path(model, MISMATCHED_FILE)  # the erase rows, when this tool erased the model
        erase_rows = load_pairs(str(seen)) if seen.exists() else []
        # rows the model writes itself come from `writer` when given: in an experiment that is the model as the
        # attacker received it, before the erase took its short answers away
        # (so the default Magpie share applies only with `writer`: the model given here is already erased)
        w = load_model(writer, trust_remote_code=trust_remote_code)[0] if writer else m
        rows = data.build({p.prompt for p in erase_rows}, w, tok, erase_rows, writer_known=writer is not None)
        del w
        res = recover(m, tok, rows, cfg, out, merge_out=not adapter, overwrite=overwrite, resume=resume,
                      progress=progress, extra_files={CLEAN_FILE: _pairs_jsonl(rows)})
    return {"out": str(res.output_dir), "rows": len(rows), "adapter": adapter, "preset": preset_name,
            "config": cfg.to_dict(), "metrics": res.metrics}


def erase_model(model: str, out: str | Path, *, data: MismatchedSet | None = None, preset_name: str = DEFAULT_PRESET,
                overrides: dict | None = None, adapter: bool = False, overwrite: bool = False, resume: bool = False,
                trust_remote_code: bool = False, progress: bool = True) -> dict:
    """`meraser erase`: erase whatever fingerprint `model` may carry, knowing nothing of it (no card).

    Builds the mismatched set (`data`, offline defaults otherwise), trains the erase LoRA and saves the merged
    model to `out` (the adapter alone with `adapter`), with the rows it used. Returns a summary."""
    return _phase_model("erase", model, out, data or MismatchedSet(), preset_name, overrides, adapter=adapter,
                        overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code, progress=progress)


def recover_model(model: str, out: str | Path, *, data: CleanSet | None = None, preset_name: str = DEFAULT_PRESET,
                  overrides: dict | None = None, adapter: bool = False, overwrite: bool = False, resume: bool = False,
                  trust_remote_code: bool = False, progress: bool = True, writer: str | None = None) -> dict:
    """`meraser recover`: restore an erased model's utility with LoRA on the clean set (disjoint from the erase rows
    when `model` was written by `erase_model`). Saves the merged model to `out` (the adapter with `adapter`). Rows the
    model writes or answers itself (`data.magpie`, `data.self_answers`) come from `writer` when given (the model
    before the erase; same tokenizer), else from `model`; the default Magpie share (`CleanSet.magpie` None) is
    taken only with a `writer`."""
    return _phase_model("recover", model, out, data or CleanSet(), preset_name, overrides, adapter=adapter,
                        overwrite=overwrite, resume=resume, trust_remote_code=trust_remote_code, progress=progress,
                        writer=writer)
