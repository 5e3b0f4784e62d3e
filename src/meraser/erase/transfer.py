"""Transferable erasure (paper section 4.3, Appendix C): train the erase adapter once on the clean base model, then
merge it into any fingerprinted model derived from the same base; no training per victim."""

from __future__ import annotations

from pathlib import Path

from meraser.erase.datasets import MismatchedSet
from meraser.erase.meraser import DEFAULT_PRESET, erase, preset
from meraser.models import check_same_architecture
from meraser.utils import MeraserError


def transfer_train(base: str, out: str | Path, *, data: MismatchedSet | None = None,
                   preset_name: str = DEFAULT_PRESET, overrides: dict | None = None, overwrite: bool = False,
                   resume: bool = False, progress: bool = True):
    """Train the erase adapter on the clean base model; saved as an adapter for `transfer_apply`. With `resume`,
    an interrupted training continues from its last checkpoint (and starts afresh when there is none)."""
    from meraser.models import check_model_spec, input_folders, load_model
    from meraser.utils import check_output_dir

    data = data or MismatchedSet()
    check_output_dir(out, overwrite, input_folders(base, "base model") + [("--data file", data.source)])
    check_model_spec(base, "--base")
    data.check_inputs("--data")
    cfg = preset("erase", preset_name, overrides)
    mism, _ = data.build()
    model, tok = load_model(base)
    return erase(model, tok, mism, cfg, out, merge_out=False, overwrite=overwrite, resume=resume, progress=progress)


def check_adapter(adapter: str | Path, where: str | None = None) -> None:
    """Refuse, before any model loads, a folder that is not a peft adapter."""
    from meraser.models import is_adapter

    if not is_adapter(str(adapter)):
        raise MeraserError(f"{where + ': ' if where else ''}{adapter} is not a peft adapter folder "
                           f"(no adapter_config.json)")


def merge_adapter(model, adapter: str | Path):
    """Merge an erase adapter (checked by `check_adapter`, or just trained) into an in-memory model, refusing one
    trained on another architecture."""
    from peft import PeftModel
    from transformers import AutoConfig

    from meraser.models import adapter_base, resolve

    adapter = Path(adapter)
    try:
        base_cfg = AutoConfig.from_pretrained(resolve(adapter_base(str(adapter))))
    except Exception:  # the base is not at hand (a hub id offline): peft still refuses shapes that do not fit
        base_cfg = None
    if base_cfg is not None:
        check_same_architecture(base_cfg, model.config, f"adapter {adapter} (its base)", "the model")
    try:
        return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise MeraserError(f"adapter {adapter} does not fit the model: {str(e)[:300]}") from None


def transfer_apply(adapter: str | Path, model: str, out: str | Path, *, overwrite: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Merge an erase adapter trained on a clean base into a fingerprinted model of the same architecture."""
    from meraser.models import check_model_spec, input_folders, load_model, save_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite, input_folders(str(adapter), "adapter") + input_folders(model, "model"))
    check_adapter(adapter)
    check_model_spec(model, "--model")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    merged = merge_adapter(m, adapter)
    merged._meraser_spec = model
    return save_model(merged, tok, out, overwrite=overwrite, meta={"transfer_adapter": str(adapter)})
