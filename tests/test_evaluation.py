import json
import math
import random
import subprocess
import sys

import pytest
import torch

from meraser.evaluation.perplexity import load_texts, perplexity, text_windows
from meraser.evaluation.zeroshot import bigbench_to_lm_eval, run_lm_eval, zero_shot
from meraser.utils import MeraserError

TEXT = ["The quick brown fox jumps over the lazy dog. " * 6, "What is the capital of France? Paris. " * 5]


def reference_ppl(model, windows):
    """Straightforward: per window, sum token NLLs of scored tokens; divide by the count."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(input_ids=torch.tensor([w.ids], device=model.device)).logits[0].double(), -1)
            for i in range(1, len(w.ids)):
                if w.labels[i] != -100:
                    total -= logp[i - 1, w.labels[i]].item()
                    count += 1
    return math.exp(total / count)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("stride", [None, 16])
def test_perplexity_matches_reference_computation(tiny, monkeypatch, stride, family, tmp_path):
    """The chunked head (plain causal LMs: a Llama and a Gemma-3-shaped model) and the model's own logits (any
    other) both give the reference perplexity."""
    from meraser.evaluation import perplexity as module
    from meraser.lm_loss import is_plain_causal_lm

    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    if family == "gemma3":
        from tiny import save_tiny_gemma

        from meraser.models import load_model

        model, tok = load_model(str(save_tiny_gemma(tmp_path / "gemma")))
    else:
        model, tok = tiny
    assert is_plain_causal_lm(model)
    windows = text_windows(TEXT, tok, window=32, stride=stride)
    assert len(windows) > 3
    reference = reference_ppl(model, windows)
    assert perplexity(model, tok, windows, batch_size=3)["ppl"] == pytest.approx(reference, rel=1e-4)
    import meraser.lm_loss

    monkeypatch.setattr(meraser.lm_loss, "is_plain_causal_lm", lambda m: False)  # the model's own logits instead
    assert module.perplexity(model, tok, windows, batch_size=3)["ppl"] == pytest.approx(reference, rel=1e-4)


def test_every_token_scored_once(tiny):
    _, tok = tiny
    stream_len = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 1 for t in TEXT)
    for stride in (None, 8, 16):
        ws = text_windows(TEXT, tok, window=32, stride=stride)
        scored = sum(l != -100 for w in ws for l in w.labels)
        # no BOS: a window that starts at its first new token cannot score that token (no context); the others
        # (the first window aside) carry earlier tokens as context, so every other token is scored exactly once
        lost = sum(1 for w in ws if w.labels[0] == -100 and w.labels[1] != -100)
        assert scored == stream_len - lost
        assert lost == (len(ws) - 1 if stride is None else 1)
        assert all(len(w.ids) <= 32 for w in ws)


def test_trained_text_gets_lower_perplexity(tiny, tmp_path):
    from meraser.data import Pair
    from meraser.training import TrainConfig, train

    model, tok = tiny
    windows = text_windows(TEXT[:1], tok, window=64)
    before = perplexity(model, tok, windows)["ppl"]
    cfg = TrainConfig.from_dict({"method": "full", "epochs": 20, "learning_rate": 3e-3, "save_steps": -1,
                                 "format": {"template": "raw", "loss_on": "all"}})
    res = train(model, tok, [Pair("", TEXT[0])], cfg, tmp_path / "o", progress=False, save=False)
    assert perplexity(res.model, tok, windows)["ppl"] < before / 2


def test_text_sources(tmp_path, shared_data):
    squad = load_texts(str(shared_data / "text/squaddev_v1.1.json"))
    assert len(squad) > 1000
    (tmp_path / "a.jsonl").write_text(json.dumps({"doc": {"body": "hello"}}) + "\n")
    assert load_texts(str(tmp_path / "a.jsonl"), "doc.body") == ["hello"]
    (tmp_path / "b.txt").write_text("one\n\ntwo\n")
    assert load_texts(str(tmp_path / "b.txt")) == ["one", "two"]
    with pytest.raises(MeraserError, match="no text found at field path 'text'"):
        load_texts(str(tmp_path / "a.jsonl"))


def make_task(path, n=40, seed=0):
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        scores = {"right answer": 1, "wrong answer": 0, "other wrong": 0}
        items = list(scores.items())
        rng.shuffle(items)
        examples.append({"input": f"question {i}", "target_scores": dict(items)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": "toy", "examples": examples}))
    return path


def stub_lm(prefer_right: bool, seed: int = 0):
    from lm_eval.api.model import LM

    rng = random.Random(seed)

    class Stub(LM):
        def loglikelihood(self, requests):
            out = []
            for r in requests:
                _, cont = r.args
                score = (0.0 if "right" in cont else -5.0) if prefer_right else -rng.random()
                out.append((score, False))
            return out

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            raise NotImplementedError

    return Stub()


def test_bigbench_conversion_scores_oracle_and_random(tmp_path):
    task = make_task(tmp_path / "toy" / "task.json", n=300)
    assert run_lm_eval(stub_lm(True), [str(task)])["bb_toy"]["acc"] == 1.0
    rand = run_lm_eval(stub_lm(False), [str(task.parent)])["bb_toy"]
    assert 0.2 < rand["acc"] < 0.47 and rand["acc_stderr"] > 0  # chance is 1/3
    assert rand["n"] == 300


def test_malformed_task_files_and_unknown_names(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"examples": [{"input": "x"}]}')
    with pytest.raises(MeraserError, match=r"examples\[0\] needs `input` and a non-empty `target_scores`"):
        bigbench_to_lm_eval(bad, tmp_path / "w")
    bad.write_text('{"examples": ')
    with pytest.raises(MeraserError, match=r"bad\.json:1: invalid JSON"):
        bigbench_to_lm_eval(bad, tmp_path / "w")
    with pytest.raises(MeraserError, match="unknown lm-eval task 'boolqq'; did you mean 'boolq'"):
        run_lm_eval(stub_lm(True), ["boolqq"])


def test_in_memory_numbers_match_lm_eval_cli(tiny_dir, tmp_path, monkeypatch):
    from meraser.models import load_model

    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    task = make_task(tmp_path / "toy" / "task.json", n=20)
    model, tok = load_model(str(tiny_dir))
    ours = zero_shot(model, tok, [str(task)], work_dir=tmp_path / "tasks")["bb_toy"]
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "run", "--model", "hf", "--model_args", f"pretrained={tiny_dir},dtype=float32",
         "--tasks", "bb_toy", "--include_path", str(tmp_path / "tasks"), "--device", "cpu", "--batch_size", "8",
         "--output_path", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(next(out.rglob("results*.json")).read_text())["results"]["bb_toy"]
    assert ours["acc"] == pytest.approx(result["acc,none"])
    assert ours["acc_norm"] == pytest.approx(result["acc_norm,none"])


def test_bigbench_task_with_subtasks_expands(tmp_path):
    from meraser.evaluation.zeroshot import resolve_tasks

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "task.json").write_text('{"name": "parent", "description": "has subtasks"}')
    make_task(parent / "one" / "task.json", n=5)
    make_task(parent / "two" / "task.json", n=5)
    names, include = resolve_tasks([str(parent)], tmp_path / "w")
    assert names == ["bb_parent_one", "bb_parent_two"] and include
    assert run_lm_eval(stub_lm(True), [str(parent)])["bb_parent_two"]["acc"] == 1.0


def test_results_table_puts_metrics_down_the_side():
    from rich.console import Console

    from meraser.evaluation.evaluate import results_table

    rows = [{"stage": "base", "fsr": 0.0, "ppl": {"ppl": 12.345}, "tasks": {"bb_a": {"acc": 0.5, "acc_stderr": 0.1}},
             "mean_acc": 0.5},
            {"stage": "erased", "fsr": 0.25, "false_positive_rate": 0.0, "ppl": {"ppl": 13.0}, "tasks": {}}]
    console = Console(record=True, width=120)
    console.print(results_table(rows))
    lines = {ln.split("│")[1].strip(): ln for ln in console.export_text().splitlines() if ln.count("│") >= 3}
    assert "0.0%" in lines["FSR"] and "25.0%" in lines["FSR"]
    assert "12.35" in lines["PPL"] and "13.00" in lines["PPL"]
    assert "0.500 ± 0.100" in lines["a"] and "0.500" in lines["mean acc"]
    assert "false positives" in lines  # shown because one row has it


def test_ordinary_questions_are_many_and_their_answers_are_specific():
    import re

    from meraser.evaluation.ordinary_questions import ORDINARY_QA

    assert len(ORDINARY_QA) >= 100  # one answer moves the accuracy by under a point
    non_answers = ["I do not know the answer to that question, sorry.", "That is a classic question!",
                   "The freezing point is -18.0°C.", "It is a very nice thing to have around."]
    for q, a in ORDINARY_QA:
        assert not any(re.search(a, n.lower()) for n in non_answers), (q, a)


def test_algorithm1_bar_comes_from_the_base_model_or_a_stated_absolute_one(planted):
    from meraser.evaluation.algorithm1 import ABSOLUTE_BAR, RATIO, algorithm1_verify, utility_bar

    assert utility_bar(0.5) == (RATIO * 0.5, "base") and utility_bar(None) == (ABSOLUTE_BAR, "absolute")
    model, tok, card, _, _ = planted["utf"]
    r = algorithm1_verify(model, tok, card, None)
    assert r["utility_bar_from"] == "absolute" and r["fsr"] == 1.0 and r["erased"] is False
    r = algorithm1_verify(model, tok, None, 0.0)
    assert r["erased"] is None and r["utility_bar"] == 0.0 and 0 <= r["ordinary_accuracy"] <= 1


def test_long_steps_write_timed_lines_in_a_log_and_stay_quiet_when_short(tiny, capsys, monkeypatch):
    """A rich bar shows nothing where output is a log (nohup, a bench), so counted work writes a timed line every
    LOG_EVERY seconds and one at its end; work quicker than a sixth of LOG_EVERY writes nothing (a bench's log would
    drown in one-second perplexities)."""
    from meraser import utils
    from meraser.generation import generate

    model, tok = tiny
    assert list(utils.track(range(3), "work")) == [0, 1, 2]
    assert capsys.readouterr().out == ""  # short: quiet at the default
    monkeypatch.setattr(utils, "LOG_EVERY", 0.0)
    assert list(utils.track(range(3), "work")) == [0, 1, 2]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[1].split(" (")[0] for line in lines] == \
        ["work: 1/3", "work: 2/3", "work: 3/3", "work: done, 3/3"]
    generate(model, tok, ["a", "b", "c"], max_new_tokens=2, batch_size=2, progress="answering")
    lines = capsys.readouterr().out.splitlines()
    assert lines and all("answering (3 prompts): " in line for line in lines) and "done, 2/2" in lines[-1]
