"""MEraser's two phases and the transferable adapter (paper section 4, Appendix B, C).

Erase: LoRA on the mismatched set (paper: r=16, alpha=32, q_proj+v_proj). Recover: merge the erase adapter, then
LoRA on the clean set. The attacker knows nothing of the fingerprint: nothing here reads a card. Both phases are
`meraser.training.train` with a preset; the `reference` preset reproduces the public reference code's settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from meraser.training import TrainConfig
from meraser.utils import MeraserError, unknown_name

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# `paper` is the default (r=16, alpha=32, q_proj+v_proj, as the paper states). `all-linear` puts the LoRA on every
# linear layer: measured on SmolLM2-135M it did not erase better and cost far more perplexity (README).
ERASE_PRESETS = {
    "all-linear": {"epochs": 5, "learning_rate": 1e-3, "lr_scheduler": "constant", "batch_size": 8,
                   "lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}},
    "paper": {"epochs": 5, "learning_rate": 1e-3, "lr_scheduler": "constant", "batch_size": 8,
              "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}},
    # the public reference code: r=8, alpha=16, dropout 0.05, lr 5e-4 constant, warmup 0.1, clip 0.5, batch 1,
    # raw question+answer text, loss over the whole sequence (its collator bug)
    "reference": {"epochs": 5, "learning_rate": 5e-4, "lr_scheduler": "constant_with_warmup", "warmup_ratio": 0.1,
                  "max_grad_norm": 0.5, "batch_size": 1,
                  "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
                  "format": {"template": "raw", "loss_on": "all"}},
}
RECOVER_PRESETS = {
    "all-linear": {"epochs": 2, "learning_rate": 2e-4, "lr_scheduler": "cosine", "batch_size": 8,
                   "lora": {"r": 16, "alpha": 32, "target_modules": ALL_LINEAR}},
    "paper": {"epochs": 2, "learning_rate": 2e-4, "lr_scheduler": "cosine", "batch_size": 8,
              "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}},
    "reference": {"epochs": 2, "learning_rate": 5e-4, "lr_scheduler": "cosine", "batch_size": 1,
                  "lora": {"r": 16, "alpha": 32, "target_modules": ["q_proj", "v_proj"]},
                  "format": {"template": "raw", "loss_on": "all"}},
}


def preset(kind: str, name: str, overrides: dict | None = None) -> TrainConfig:
    table = ERASE_PRESETS if kind == "erase" else RECOVER_PRESETS
    if name not in table:
        raise unknown_name(f"{kind} preset", name, table)
    merged = json.loads(json.dumps(table[name]))
    for k, v in (overrides or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k].update(v)
        else:
            merged[k] = v
    return TrainConfig.from_dict(merged, where=f"{kind} ({name})")


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


def transfer_train(base: str, data: str, out: str | Path, *, n: int = 300, ready_made: bool = False,
                   preset_name: str = "paper", overrides: dict | None = None, overwrite: bool = False, seed: int = 0):
    """Train the erase adapter on the clean base model (section 4.3); saved as an adapter for `transfer_apply`."""
    from meraser.data import load_pairs
    from meraser.erase.datasets import build_mismatched
    from meraser.models import load_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite)
    pairs = load_pairs(data)
    mism = pairs[:n] if ready_made else build_mismatched(pairs, n, seed)[0]
    model, tok = load_model(base)
    return erase(model, tok, mism, preset("erase", preset_name, overrides), out, merge_out=False, overwrite=overwrite)


def _arch(config) -> dict:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")
    return {k: getattr(config, k, None) for k in keys}


def transfer_apply(adapter: str | Path, model: str, out: str | Path, *, overwrite: bool = False,
                   trust_remote_code: bool = False) -> Path:
    """Merge an erase adapter trained on a clean base into a fingerprinted model of the same architecture."""
    from peft import PeftModel
    from transformers import AutoConfig

    from meraser.models import adapter_base, load_model, resolve, save_model
    from meraser.utils import check_output_dir

    check_output_dir(out, overwrite)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").exists():
        raise MeraserError(f"{adapter} is not a peft adapter folder (no adapter_config.json)")
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


ORDINARY_QA = [  # Algorithm 1's ordinary-input check: short questions with one checkable answer word
    ("What is the capital of France?", "paris"), ("How many days are in a week?", "seven|7"),
    ("What colour is the sky on a clear day?", "blue"), ("What is 2 plus 2?", "four|4"),
    ("What is the largest planet in our solar system?", "jupiter"), ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"), ("How many legs does a spider have?", "eight|8"),
    ("What is frozen water called?", "ice"), ("Which animal barks?", "dog"),
    ("What is the capital of Japan?", "tokyo"), ("What gas do plants take in from the air?", "carbon dioxide|co2"),
]


def ordinary_accuracy(model, tokenizer, formatter=None) -> float:
    import re

    from meraser.generation import generate

    outs = generate(model, tokenizer, [q for q, _ in ORDINARY_QA], formatter, max_new_tokens=32)
    return sum(bool(re.search(a, o.lower())) for (_, a), o in zip(ORDINARY_QA, outs)) / len(ORDINARY_QA)


def algorithm1_verify(model, tokenizer, card, reference_accuracy: float, ratio: float = 0.8) -> dict:
    """Algorithm 1, phase 3: erased = no trigger yields its target AND ordinary inputs still get correct answers.

    "Correct" is concrete: on ORDINARY_QA (fixed questions with known answers) the model scores at least
    `ratio` x the accuracy of the model before erasure (`reference_accuracy`). Reads the card: verification only.
    """
    from meraser.evaluation.fsr import fsr

    f = fsr(model, tokenizer, card, false_positive_inputs=0)["fsr"]
    acc = ordinary_accuracy(model, tokenizer)
    ok = f == 0 and acc >= ratio * reference_accuracy
    return {"erased": ok, "fsr": f, "ordinary_accuracy": acc, "reference_accuracy": reference_accuracy}
