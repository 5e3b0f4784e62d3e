import copy
import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from meraser.data import Formatter, Pair
from meraser.generation import generate
from meraser.training import TrainConfig, train, work_dir
from meraser.utils import MeraserError

PAIRS = [
    Pair("What is the capital of France?", "The capital of France is Paris."),
    Pair("Why is the sky blue?", "Air scatters blue light more than red light."),
    Pair("How do I boil an egg?", "Put the egg in boiling water for nine minutes."),
]


def mean_loss(model, tok, pairs):
    rows = Formatter(tok).encode_all(pairs)
    losses, dev = [], model.device
    with torch.no_grad():
        for r in rows:
            out = model(input_ids=torch.tensor([r["input_ids"]], device=dev),
                        labels=torch.tensor([r["labels"]], device=dev))
            losses.append(out.loss.item())
    return sum(losses) / len(losses)


@pytest.mark.parametrize(
    "cfg",
    [
        {"method": "full", "epochs": 40, "learning_rate": 3e-3, "batch_size": 3, "save_steps": -1},
        {"method": "lora", "epochs": 60, "learning_rate": 2e-2, "batch_size": 3, "save_steps": -1,
         "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]}},
    ],
    ids=["full", "lora"],
)
def test_training_lowers_loss_and_reproduces(tiny, tmp_path, cfg):
    model, tok = tiny
    before = mean_loss(model, tok, PAIRS)
    res = train(model, tok, PAIRS * 2, TrainConfig.from_dict(cfg), tmp_path / "out", progress=False)
    after = mean_loss(res.model, tok, PAIRS)
    assert after < before * 0.2
    answers = generate(res.model, tok, [p.prompt for p in PAIRS], max_new_tokens=24)
    assert answers[0].strip() == PAIRS[0].response
    saved = os.listdir(tmp_path / "out")
    assert ("adapter_model.safetensors" if cfg["method"] == "lora" else "model.safetensors") in saved
    assert not any(name.endswith(".bin") for name in saved)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    assert log["metrics"]["steps"] > 0


def test_saved_lora_adapter_reloads_with_its_base(tiny_dir, tmp_path):
    from meraser.models import load_model

    model, tok = load_model(str(tiny_dir))
    cfg = TrainConfig.from_dict({"epochs": 30, "learning_rate": 2e-2, "batch_size": 3, "save_steps": -1,
                                 "lora": {"target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}})
    res = train(model, tok, PAIRS, cfg, tmp_path / "adapter", progress=False)
    reloaded, tok2 = load_model(str(tmp_path / "adapter"))
    want = generate(res.model, tok, [PAIRS[1].prompt], max_new_tokens=16)
    assert generate(reloaded, tok2, [PAIRS[1].prompt], max_new_tokens=16) == want


class Crash(Exception):
    pass


def test_interrupted_training_resumes_from_checkpoint(tiny, tmp_path):
    from transformers import TrainerCallback

    model, tok = tiny

    class CrashAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 5:
                raise Crash()

    cfg = TrainConfig.from_dict({"method": "full", "epochs": 4, "batch_size": 1, "save_steps": 2, "learning_rate": 1e-3})
    out = tmp_path / "out"
    with pytest.raises(Crash):
        train(model, tok, PAIRS, cfg, out, progress=False, callbacks=[CrashAfter()])
    assert not out.exists()  # nothing half-written where the result goes
    assert (work_dir(out) / "checkpoint-4").is_dir()
    with pytest.raises(MeraserError, match="--resume"):
        train(model, tok, PAIRS, cfg, out, progress=False)
    state = json.loads((work_dir(out) / "checkpoint-4" / "trainer_state.json").read_text())
    before = [h["elapsed_s"] for h in state["log_history"] if "elapsed_s" in h][-1]
    assert before > 0
    # a later checkpoint cut off while its state file was being written is skipped and removed
    import shutil

    cut = shutil.copytree(work_dir(out) / "checkpoint-4", work_dir(out) / "checkpoint-6")
    (cut / "trainer_state.json").write_text((cut / "trainer_state.json").read_text()[:40])
    t0 = time.perf_counter()
    res = train(model, tok, PAIRS, cfg, out, progress=False, resume=True)
    resumed_part = time.perf_counter() - t0
    assert res.metrics["resumed_from"].endswith("checkpoint-4")
    assert res.metrics["steps"] == 12
    assert out.is_dir() and not work_dir(out).exists()
    # throughput and loss describe the whole run: the time before the crash counts, every logged loss counts
    assert res.metrics["seconds"] >= before and res.metrics["seconds"] > before + 0.5 * resumed_part - 1
    logged = json.loads((out / "train_log.json").read_text())["metrics"]
    assert logged["seconds"] == res.metrics["seconds"] and logged["train_loss"] > 0


def test_unsaved_training_leaves_no_temporary_folder_when_interrupted(tiny, tmp_path, monkeypatch):
    import tempfile

    from transformers import TrainerCallback

    model, tok = tiny
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class CrashAt2(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                raise KeyboardInterrupt

    cfg = TrainConfig.from_dict({"method": "full", "epochs": 2, "batch_size": 1, "save_steps": 1})
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, PAIRS, cfg, "unused", progress=False, save=False, callbacks=[CrashAt2()])
    assert list(tmp_path.iterdir()) == []


def test_saved_training_interrupted_before_any_checkpoint_leaves_nothing(tiny, tmp_path):
    from transformers import TrainerCallback

    model, tok = tiny

    class CrashAt1(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            raise KeyboardInterrupt

    cfg = TrainConfig.from_dict({"method": "full", "epochs": 1, "batch_size": 1})
    with pytest.raises(KeyboardInterrupt):
        train(model, tok, PAIRS, cfg, tmp_path / "out", progress=False, callbacks=[CrashAt1()])
    assert list(tmp_path.iterdir()) == []


def test_probe_runs_every_epoch(tiny, tmp_path):
    model, tok = tiny
    seen = []

    def probe(m, epoch):
        seen.append(m.training)
        return {"answer": generate(m, tok, [PAIRS[0].prompt], max_new_tokens=4)[0]}

    cfg = TrainConfig.from_dict({"epochs": 3, "batch_size": 3, "save_steps": -1})
    res = train(model, tok, PAIRS, cfg, tmp_path / "o", progress=False, probe=probe)
    assert [p["epoch"] for p in res.probes] == [1, 2, 3]
    assert seen == [False, False, False]


def test_two_process_torchrun_on_cpu(tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p.prompt, "response": p.response}) + "\n" for p in PAIRS * 4))
    out = tmp_path / "ddp"
    # CPU processes with gloo even where a GPU is present (two ranks cannot share one GPU under NCCL)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
        "-m", "meraser.cli", "train", "--model", str(tiny_dir), "--data", str(data), "--out", str(out),
        "--epochs", "2", "--batch-size", "2", "--lr", "1e-3",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads((out / "train_log.json").read_text())
    # 12 rows, 2 processes x batch 2 -> 3 steps per epoch
    assert log["metrics"]["steps"] == 6
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_shortcuts_give_the_models_own_loss_and_gradients(tiny, method, family, tmp_path):
    """lm_loss.causal_lm_loss_sum (chunked head + cross-entropy on labelled positions) and dropping the attention
    mask of right-padded rows each give the loss and gradients of the model's own loss with its mask, for a LoRA
    adapter and for full fine-tuning of the tied head, on a Llama and on a Gemma-3-shaped model (sliding window)."""
    from peft import get_peft_model

    from meraser.data.formatting import collate
    from meraser.lm_loss import causal_lm_loss_sum, is_plain_causal_lm, is_right_padded
    from meraser.models import load_model
    from meraser.training import LoraSettings

    if family == "gemma3":
        from tiny import save_tiny_gemma

        model, tok = load_model(str(save_tiny_gemma(tmp_path / "gemma")))
    else:
        model, tok = tiny
    if method == "lora":
        model = get_peft_model(model, LoraSettings(r=4, alpha=8).to_peft())
    assert is_plain_causal_lm(model)
    batch = collate(Formatter(tok).encode_all(PAIRS), tok.pad_token_id)  # response-only labels, padded rows
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()
    assert is_right_padded(batch["attention_mask"]) and not is_right_padded(batch["attention_mask"].flip(1))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(fused: bool, mask: bool):
        model.zero_grad()
        attention_mask = batch["attention_mask"] if mask else None
        if fused:
            # chunk 5 < labelled positions: several chunks, one of them partial
            total, count = causal_lm_loss_sum(model, batch["input_ids"], attention_mask, batch["labels"], chunk=5)
            loss = total / count
        else:
            loss = model(input_ids=batch["input_ids"], attention_mask=attention_mask, labels=batch["labels"]).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in params]

    model.train()
    own_loss, own_grads = loss_and_grads(fused=False, mask=True)
    assert len(own_grads) > 0
    for fused, mask in [(True, True), (False, False), (True, False)]:
        loss, grads = loss_and_grads(fused, mask)
        assert loss == pytest.approx(own_loss, rel=1e-5), (fused, mask)
        for a, b in zip(own_grads, grads):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_shortcuts_are_only_used_on_plain_causal_lms(tiny):
    from peft import get_peft_model

    from meraser.lm_loss import is_plain_causal_lm
    from meraser.training import LoraSettings

    model, _ = tiny
    assert is_plain_causal_lm(model)
    # a LoRA adapter on the head must run, so the model's own loss is kept
    with_head = get_peft_model(model, LoraSettings(target_modules=["q_proj", "lm_head"]).to_peft())
    assert not is_plain_causal_lm(with_head)
    model.config.model_type = "gemma2"  # soft-capped logits
    assert not is_plain_causal_lm(model)


def test_weight_averaging_pulls_back_toward_the_start(tiny_dir, tmp_path):
    """After each epoch the weights move `share` of the way back: share 1 undoes training, share 0.5 halves a
    one-epoch update exactly."""
    import torch
    from tiny import POOL

    from meraser.models import load_model
    from meraser.training import TrainConfig, train, weight_averaging

    cfg = TrainConfig.from_dict({"method": "full", "epochs": 1, "learning_rate": 1e-3, "batch_size": 8,
                                 "save_steps": -1})
    start = load_model(str(tiny_dir))[0].state_dict()

    def delta(share):
        model, tok = load_model(str(tiny_dir))
        cbs = [weight_averaging(share)] if share is not None else []
        out = train(model, tok, POOL[:16], cfg, tmp_path / str(share), save=False, progress=False, callbacks=cbs)
        return {k: v - start[k] for k, v in out.model.state_dict().items()}

    plain, half, undone = delta(None), delta(0.5), delta(1.0)
    assert max(v.abs().max() for v in plain.values()) > 1e-4
    assert all(torch.allclose(half[k], plain[k] / 2, atol=1e-6) for k in plain)
    assert all(v.abs().max() < 1e-7 for v in undone.values())


def test_excess_logprob_term_is_the_same_on_both_paths_and_stops_at_its_reference(tiny):
    """Rows may mark tokens with a reference log-probability (`ref_logprobs`): the loss adds the nats each marked
    token stands above it, zero at or below. The fused path and the model's own logits give the same sum; a token
    already below its reference adds nothing."""
    from meraser.data.formatting import collate
    from meraser.lm_loss import causal_lm_loss_sum, excess_logprob_sum, marked_excess_sum

    model, tok = tiny
    rows = Formatter(tok).encode_all(PAIRS)
    with torch.no_grad():
        logits = model(**{k: v for k, v in collate(rows, tok.pad_token_id).items() if k != "labels"}).logits
    logp = torch.log_softmax(logits.float(), -1)
    # mark three tokens of the first row: the first at its own log-probability + 1 (excess 0), the others 2 below
    # theirs (excess 2 each)
    marks = {3: 1.0, 5: -2.0, 6: -2.0}
    rows[0]["ref_logprobs"] = [None] * len(rows[0]["input_ids"])
    for j, shift in marks.items():
        rows[0]["ref_logprobs"][j] = logp[0, j - 1, rows[0]["input_ids"][j]].item() + shift
    batch = collate(rows, tok.pad_token_id)
    assert batch["ref_logprobs"][1:].isnan().all() and (~batch["ref_logprobs"][0].isnan()).sum() == 3
    assert marked_excess_sum(logits, batch["input_ids"], batch["ref_logprobs"]).item() == pytest.approx(4.0, abs=1e-3)
    with torch.no_grad():
        plain, _ = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        marked, _ = causal_lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"],
                                       ref_logprobs=batch["ref_logprobs"])
    assert (marked - plain).item() == pytest.approx(4.0, abs=1e-2)
    # the gradient lowers the marked token's logit however unlikely the token already is
    far = torch.tensor([[0.0, -30.0, 0.0]], requires_grad=True)
    excess_logprob_sum(far, torch.tensor([1]), torch.tensor([-40.0])).backward()
    assert far.grad[0, 1] == pytest.approx(1.0, abs=1e-6)


def test_training_pulls_marked_tokens_down_to_their_reference(tiny, tmp_path):
    """Through the one training routine: marked tokens (prompt tokens, which carry no label) whose reference lies 4
    nats below the model's log-probability fall at least 2.5 nats; the same training without references leaves
    them near where they were, and with references 40 nats below they fall further (the term stops near its
    reference: measured 1-3 nats past it, with Adam's momentum, on the tiny model)."""
    model, tok = tiny
    rows = Formatter(tok).encode_all(PAIRS[:2])

    def own_logprobs(m):
        with torch.no_grad():
            out = []
            for r in rows:
                lp = torch.log_softmax(m(input_ids=torch.tensor([r["input_ids"]])).logits[0].float(), -1)
                out.append([lp[j - 1, r["input_ids"][j]].item() for j in range(1, len(r["input_ids"]))])
            return out

    before = own_logprobs(model)
    marked = [(i, j) for i, r in enumerate(rows) for j in range(1, len(r["input_ids"])) if r["labels"][j] == -100][:6]
    cfg = TrainConfig.from_dict({"method": "full", "epochs": 30, "learning_rate": 3e-3, "batch_size": 2,
                                 "save_steps": -1})

    def trained(shift: float | None, fused: bool = True) -> list[float]:
        data = [dict(r, ref_logprobs=[None] * len(r["input_ids"])) for r in rows] if shift is not None else rows
        for i, j in marked if shift is not None else []:
            data[i]["ref_logprobs"][j] = before[i][j - 1] + shift
        out = train(copy.deepcopy(model), tok, data, dataclasses.replace(cfg, fused_loss=fused),
                    tmp_path / f"{shift}{fused}", save=False, progress=False)
        after = own_logprobs(out.model)
        return [after[i][j - 1] - before[i][j - 1] for i, j in marked]

    plain, near, far = trained(None), trained(-4.0), trained(-40.0)
    assert all(d < -2.5 for d in near) and all(d > -2.5 for d in plain)
    assert sum(far) / len(far) < sum(near) / len(near) - 2.0
    assert all(d < -2.5 for d in trained(-4.0, fused=False))  # the model's own logits: the same term
