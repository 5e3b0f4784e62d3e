import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meraser.config import load_yaml
from meraser.models import load_model, save_model
from meraser.training import TrainConfig
from meraser.utils import MeraserError, OutputExistsError, atomic_dir


def tree_hash(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def test_save_refuses_existing_folder_without_overwrite(tiny, tmp_path):
    model, tok = tiny
    out = save_model(model, tok, tmp_path / "m")
    assert (out / "model.safetensors").exists()
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_model(model, tok, out)
    save_model(model, tok, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary leftovers


def test_interrupted_save_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "half.safetensors").write_text("x")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_input_model_folder_is_never_modified(tiny_dir, tmp_path):
    from meraser.data import Pair
    from meraser.training import train

    before = tree_hash(tiny_dir)
    model, tok = load_model(str(tiny_dir))
    train(model, tok, [Pair("a", "b")], TrainConfig.from_dict({"epochs": 1, "save_steps": -1}), tmp_path / "o", progress=False)
    assert tree_hash(tiny_dir) == before


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(MeraserError, match="does not exist"):
        load_model(str(tmp_path / "nope"))


def test_unknown_config_key_gets_suggestion():
    with pytest.raises(MeraserError, match="unknown key 'learning_rat'; did you mean 'learning_rate'"):
        TrainConfig.from_dict({"learning_rat": 1e-3})
    with pytest.raises(MeraserError, match=r"lora: unknown key 'rank'"):
        TrainConfig.from_dict({"lora": {"rank": 8}})
    with pytest.raises(MeraserError, match="expected int"):
        TrainConfig.from_dict({"batch_size": "eight"})
    with pytest.raises(MeraserError, match="did you mean 'full'"):
        TrainConfig.from_dict({"method": "ful"})
    assert TrainConfig.from_dict({"learning_rate": "1e-4"}).learning_rate == 1e-4


def test_a_nested_config_default_is_a_fresh_copy_per_instance():
    from meraser.fingerprints.rofl import RoFLConfig

    a, b = RoFLConfig(), RoFLConfig.from_dict({"search": {"steps": 3}})
    a.search.steps = 7
    assert RoFLConfig().search.steps not in (3, 7) and RoFLConfig().search.top_k == 256
    assert b.search.steps == 3 and b.search.top_k == 256  # a partial override keeps the method's own defaults


def test_duplicate_yaml_key_is_refused(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 3\nlearning_rate: 1e-4\nepochs: 5\n")
    with pytest.raises(MeraserError, match=r"c\.yaml:3: duplicate key 'epochs'"):
        load_yaml(f)


def test_help_is_fast_and_lists_commands():
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "meraser.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "train" in proc.stdout
    assert time.perf_counter() - t < 3  # interpreter start included; the import itself stays light
    proc = subprocess.run(
        [sys.executable, "-c", "import meraser.cli, sys; print('torch' in sys.modules, 'transformers' in sys.modules)"],
        capture_output=True, text=True,
    )
    assert proc.stdout.strip() == "False False"


def test_commands_keep_library_chatter_off_the_screen(tmp_path, monkeypatch):
    import logging
    import warnings

    from meraser.cli.common import quiet_libraries

    monkeypatch.delenv("HF_DATASETS_DISABLE_PROGRESS_BARS", raising=False)
    monkeypatch.setattr(logging.getLogger("lm_eval"), "level", logging.NOTSET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("something else is deprecated", FutureWarning)
    assert [str(w.message) for w in caught] == ["something else is deprecated"]
    assert logging.getLogger("lm_eval.models.huggingface").getEffectiveLevel() == logging.ERROR
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


def test_help_names_every_registered_decoding_attack_where_one_can_be_chosen():
    from meraser.attacks import REGISTRY
    from meraser.attacks.base import is_decoding
    from meraser.cli import app

    decoding = [name for name, a in REGISTRY.items() if is_decoding(a)]
    assert {"cleangen", "suppress-topk", "gri"} <= set(decoding) and "finetune" not in decoding
    for argv in (["verify", "--help"], ["chat", "--help"], ["attack", "--help"]):
        # rich wraps the option table anywhere, hyphens included: compare with the spaces and rules taken out
        out = CliRunner().invoke(app, argv, env={"COLUMNS": "200"}).output
        text = "".join(c for c in out if not c.isspace() and c != "│")
        missing = [name for name in decoding if name not in text]
        assert not missing, f"{argv[0]} --help does not name {missing}"


def test_cli_refuses_existing_output_and_reports_cleanly(tiny_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    proc = subprocess.run(
        [sys.executable, "-m", "meraser.cli", "train", "--model", str(tiny_dir), "--data", "chitchat",
         "--out", str(tmp_path / "out"), "--limit", "4"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "--overwrite" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


@pytest.mark.slow
def test_embedded_default_model_answers_and_caches(tmp_path, monkeypatch):
    from meraser.generation import generate

    monkeypatch.setenv("MERASER_CACHE", str(tmp_path / "cache"))
    model, tok = load_model("smollm2-135m")
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    answer = generate(model, tok, ["What is the capital of France?"], max_new_tokens=16)[0]
    assert "Paris" in answer
    cached = tmp_path / "cache" / "smollm2-135m-instruct"
    assert (cached / "model.safetensors").exists() and "quantization_config" not in (cached / "config.json").read_text()
    t = time.perf_counter()
    again, tok2 = load_model("smollm2-135m")
    assert time.perf_counter() - t < 3
    assert generate(again, tok2, ["What is the capital of France?"], max_new_tokens=16)[0] == answer


def test_shipped_example_configs_parse():
    from meraser.config import load_yaml

    for f in sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("train*.yaml")):
        TrainConfig.from_dict(load_yaml(f), where=str(f))


def test_shipped_experiment_yamls_parse():
    from meraser.runner import load_experiment

    files = sorted(Path(__file__).resolve().parents[1].joinpath("examples").glob("*.yaml"))
    experiments = [f for f in files if not f.name.startswith("train")]
    assert experiments
    for f in experiments:
        load_experiment(f)


def test_an_adapter_chain_moved_as_a_whole_still_loads(tiny_dir, tmp_path):
    """An adapter records its base folder absolutely and relative to itself: a run folder copied or moved as a whole
    (base model and the adapters over it) loads from its new place after the old one is gone."""
    import shutil

    import torch
    from peft import get_peft_model

    from meraser.training import LoraSettings

    run = tmp_path / "run"
    base, tok = load_model(str(tiny_dir))
    base_dir = save_model(base, tok, run / "fingerprinted")
    model, tok = load_model(str(base_dir))
    peft = get_peft_model(model, LoraSettings(r=4, alpha=8).to_peft())
    for n, p in peft.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a non-zero adapter, so the merged weights differ from the base's
    peft._meraser_spec = str(base_dir)
    save_model(peft, tok, run / "erased")
    before = load_model(str(run / "erased"))[0].state_dict()

    moved = shutil.move(str(run), str(tmp_path / "elsewhere"))
    after = load_model(str(Path(moved) / "erased"))[0].state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(MeraserError, match="does not exist"):  # a base gone for good is still a clear error
        shutil.rmtree(Path(moved) / "fingerprinted")
        load_model(str(Path(moved) / "erased"))


def test_a_kv_cache_is_read_without_transformers_deprecated_name(tiny):
    """The likelihood test reads a prefix's cache on every batch; newer transformers warn on each read of
    `past_key_values`, and that warning leaked into every bench log."""
    import logging

    import transformers

    from meraser.models import encode_prefix

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    root = transformers.utils.logging.get_logger("transformers")
    level = transformers.utils.logging.get_verbosity()
    logging.Logger.warning_once.cache_clear()
    root.addHandler(handler)
    transformers.utils.logging.set_verbosity_warning()
    try:
        cache = encode_prefix(tiny[0], [1, 2, 3])
    finally:
        root.removeHandler(handler)
        transformers.utils.logging.set_verbosity(level)
    assert cache is not None and cache.get_seq_length() == 3
    assert not [m for m in seen if "deprecated" in m], seen


def test_padded_batches_put_the_pad_and_the_mask_on_the_asked_side():
    from meraser.models import padded

    ids, mask = padded([[5, 6, 7], [8]], pad=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = padded([[5, 6, 7], [8], []], pad=9, left=True)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8], [9, 9, 9]] and mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]


def test_the_pad_id_falls_back_to_eos_then_zero():
    from types import SimpleNamespace

    from meraser.models import pad_id

    assert pad_id(SimpleNamespace(pad_token_id=3, eos_token_id=2)) == 3
    assert pad_id(SimpleNamespace(pad_token_id=0, eos_token_id=2)) == 0  # id 0 is a pad id, not a missing one
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=2)) == 2
    assert pad_id(SimpleNamespace(pad_token_id=None, eos_token_id=None)) == 0


@pytest.mark.parametrize("avx512_bf16, amx, onednn, expected", [
    (False, False, True, None),  # oneDNN emulates bf16 on plain AVX-512 (3.3x slower than fp32): stay in fp32
    (True, False, True, "bf16"),
    (False, True, True, "bf16"),
])
def test_cpu_autocast_only_where_the_cpu_has_native_bf16(monkeypatch, avx512_bf16, amx, onednn, expected):
    import platform

    import torch

    from meraser.models import autocast_dtype

    monkeypatch.delenv("MERASER_PRECISION", raising=False)
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert autocast_dtype("cpu") == {None: None, "bf16": torch.bfloat16}[expected]
    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    assert autocast_dtype("cpu") is None
