import json
import subprocess
import sys

import pytest
from tiny import POOL, TINY_ERASE, TINY_RECOVER

from meraser.data import Pair
from meraser.erase.datasets import build_clean, build_mismatched
from meraser.erase.meraser import erase, preset, recover
from meraser.erase.transfer import transfer_apply
from meraser.evaluation.fsr import fsr
from meraser.utils import MeraserError


def test_mismatched_is_a_derangement_across_types_and_reproducible():
    rows, meta = build_mismatched(POOL, n=60, seed=3)
    original = {p.prompt: p.response for p in POOL}
    assert all(original[r.prompt] != r.response for r in rows)
    assert all(m["q_type"] != m["answer_from_type"] for m in meta)
    assert build_mismatched(POOL, n=60, seed=3)[0] == rows
    assert build_mismatched(POOL, n=60, seed=4)[0] != rows
    tiny_pool = [Pair(f"What {i} is it?", f"It is the number {i}.") for i in range(2)]
    pair_rows, _ = build_mismatched(tiny_pool, n=2, seed=0)  # one type only: still no row keeps its answer
    assert all(dict((p.prompt, p.response) for p in tiny_pool)[r.prompt] != r.response for r in pair_rows)


def test_clean_is_disjoint_from_mismatched_and_filtered():
    rows, _ = build_mismatched(POOL, n=40, seed=0)
    noisy = POOL + [Pair("Say something long please", "aaaaaaaaaaaaaaaaaaaaaaaaaaaa"), Pair("Empty one here?", "  ")]
    clean = build_clean(noisy, n=60, seed=0, exclude_prompts={r.prompt for r in rows})
    assert not {c.prompt for c in clean} & {r.prompt for r in rows}
    assert all(c.response.strip() and "aaaaaaaaaaaaaaaa" not in c.response for c in clean)
    assert build_clean(noisy, n=60, seed=0, exclude_prompts={r.prompt for r in rows}) == clean
    with pytest.raises(MeraserError, match="need 500 usable clean pairs"):
        build_clean(POOL, n=500)




@pytest.mark.parametrize("name", ["if-sft", "utf", "chain-hash"])
def test_erase_then_recover_kills_each_fingerprint(planted, name, tmp_path):
    import copy

    fp_model, tok, card, _, _ = planted[name]
    model = copy.deepcopy(fp_model)
    assert fsr(model, tok, card, false_positive_inputs=0)["fsr"] == 1.0
    mism, _ = build_mismatched(POOL, n=48, seed=0)
    clean = build_clean(POOL, n=48, seed=0, exclude_prompts={p.prompt for p in mism})
    erased = erase(model, tok, mism, preset("erase", "paper", TINY_ERASE), tmp_path / "erased", progress=False).model
    assert fsr(erased, tok, card, false_positive_inputs=0)["fsr"] == 0.0
    recovered = recover(erased, tok, clean, preset("recover", "paper", TINY_RECOVER), tmp_path / "rec",
                        progress=False).model
    assert fsr(recovered, tok, card, false_positive_inputs=0)["fsr"] == 0.0


def test_presets_and_unknown_preset():
    ref = preset("erase", "reference")
    assert (ref.lora.r, ref.lora.alpha, ref.learning_rate, ref.max_grad_norm, ref.format.template,
            ref.format.loss_on) == (8, 16, 5e-4, 0.5, "raw", "all")
    with pytest.raises(MeraserError, match="did you mean 'paper'"):
        preset("erase", "papr")
    # `strong` is the paper's recipe with only what was measured changed: 3x the erase rate, 4 recovery epochs
    paper_e, paper_r, strong_e, strong_r = (preset(k, n) for n in ("paper", "strong") for k in ("erase", "recover"))
    assert (strong_e.learning_rate, strong_r.epochs) == (3 * paper_e.learning_rate, 2 * paper_r.epochs)
    assert strong_e.to_dict() | {"learning_rate": paper_e.learning_rate} == paper_e.to_dict()
    assert strong_r.to_dict() | {"epochs": paper_r.epochs} == paper_r.to_dict()
    from meraser.erase.meraser import ERASE_PRESETS, RECOVER_PRESETS

    assert list(ERASE_PRESETS) == list(RECOVER_PRESETS)  # one `preset:` name picks both phases' settings


def test_transfer_apply_refuses_mismatched_architecture(tiny_dir, tmp_path):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from tiny import save_tiny, tiny_model, tiny_tokenizer

    from meraser.models import load_model
    from meraser.training import train

    base, tok = load_model(str(tiny_dir))
    train(base, tok, POOL[:8], preset("erase", "paper", {"epochs": 1, "save_steps": -1}), tmp_path / "adapter",
          progress=False)
    other = tmp_path / "wide"
    tok2 = tiny_tokenizer()
    m = tiny_model(tok2, hidden=128)
    m.save_pretrained(other)
    tok2.save_pretrained(other)
    with pytest.raises(MeraserError, match="another architecture.*hidden_size"):
        transfer_apply(tmp_path / "adapter", str(other), tmp_path / "out")
    same = save_tiny(tmp_path / "same", seed=5)
    merged = transfer_apply(tmp_path / "adapter", str(same), tmp_path / "out")
    assert (merged / "model.safetensors").exists()


def test_run_resumes_after_a_kill_without_redoing_stages(planted, tmp_path):
    import yaml

    folder = planted["utf"][4]
    data = tmp_path / "pool.jsonl"
    data.write_text("".join(json.dumps(p.to_dict()) + "\n" for p in POOL))
    exp = {
        "out": str(tmp_path / "run"), "fingerprint": {"existing": str(folder)},
        "mismatched": {"source": str(data), "n": 40}, "clean": {"source": str(data), "n": 40},
        "erase": {"overrides": {**TINY_ERASE, "save_steps": 40}},
        "recover": {"overrides": TINY_RECOVER}, "eval": {"false_positive_inputs": 4},
    }
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    cmd = [sys.executable, "-m", "meraser.cli", "run", str(cfg)]
    # kill the first run during erase, after its first checkpoint
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    work = tmp_path / "run" / ".erased.work"
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not any(work.glob("checkpoint-*")) and proc.poll() is None:
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    results = [json.loads(l) for l in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in results] == ["base", "fingerprinted"]
    assert not (tmp_path / "run" / "erased").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(l) for l in (tmp_path / "run" / "results.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in results] == ["base", "fingerprinted", "erased", "recovered"]  # none redone
    assert [r["fsr"] for r in results] == [0.0, 1.0, 0.0, 0.0]
    # the probes of the epochs before the kill came back with the checkpoint
    assert [p["epoch"] for p in results[2]["fsr_per_epoch"]] == list(range(1, TINY_ERASE["epochs"] + 1))
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Table 1" in page and "data:image/png;base64," in page and "100.0%" in page
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and len((tmp_path / "run" / "results.jsonl").read_text().splitlines()) == 4


def test_report_refuses_a_folder_without_results(tmp_path):
    from meraser.report import write_report

    with pytest.raises(MeraserError, match="no results.jsonl"):
        write_report([tmp_path], tmp_path / "r.html")
    assert not (tmp_path / "r.html").exists()
