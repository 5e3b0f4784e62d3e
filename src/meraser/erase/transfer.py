"""Transferable erasure (paper section 4.3, Appendix C): train the erase adapter once on the clean base model, then
merge it into any fingerprinted model derived from the same base; no training per victim."""

from __future__ import annotations

from pathlib import Path

from meraser.erase.datasets import MismatchedSet
from meraser.erase.meraser import DEFAULT_PRESET, erase, preset
from meraser.utils import MeraserError


def transfer_train(base: str, out: str | Path, *, data: MismatchedSet | None = None,
                   preset_name: str = DEFAULT_PRESET, overrides: dict | None = None, overwrite: bool = False,
                   progress: bool = True):
    """Train the erase adapter on the clean base model; saved as an adapter for `transfer_apply`."""
    from meraser.models import check_model_spec, load_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite)
    check_model_spec(base, "--base")
    data = data or MismatchedSet()
    data.check_inputs("--data")
    cfg = preset("erase", preset_name, overrides)
    mism, _ = data.build()
    model, tok = load_model(base)
    return erase(model, tok, mism, cfg, out, merge_out=False, overwrite=overwrite, progress=progress)


def _arch(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def transfer_apply(adapter: str | Path, model: str, out: str | Path, *, overwrite: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Merge an erase adapter trained on a clean base into a fingerprinted model of the same architecture."""
    from peft import PeftModel
    from transformers import AutoConfig

    from meraser.models import adapter_base, check_model_spec, load_model, resolve, save_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise MeraserError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
    check_model_spec(model, "--model")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    try:
        base_cfg = AutoConfig.from_pretrained(resolve(adapter_base(str(adapter))), trust_remote_code=trust_remote_code)
    except Exception:
        base_cfg = None
    if base_cfg is not None and _arch(base_cfg) != _arch(m.config):
        diff = {k: (v, _arch(m.config)[k]) for k, v in _arch(base_cfg).items() if v != _arch(m.config)[k]}
        raise MeraserError(f"adapter {adapter} was trained on another architecture; differing (adapter base, model): {diff}")
    try:
        merged = PeftModel.from_pretrained(m, str(adapter)).merge_and_unload()
    except (RuntimeError, ValueError, KeyError) as e:
        raise MeraserError(f"adapter {adapter} does not fit model {model}: {str(e)[:300]}") from None
    merged._meraser_spec = model
    return save_model(merged, tok, out, overwrite=overwrite, meta={"transfer_adapter": str(adapter)})
