"""A second architecture: a tiny Gemma-3-shaped model (sliding-window layers, one KV head, no chat template) goes
through fingerprint -> erase -> recover -> verify like the tiny Llama, and an adapter does not cross families."""

import json

import pytest
from conftest import tiny_cfg
from tiny import POOL, TINY_ERASE, TINY_RECOVER, save_tiny_gemma

from meraser.erase.datasets import build_clean, build_mismatched
from meraser.erase.meraser import erase, preset, recover
from meraser.evaluation.fsr import fsr
from meraser.utils import MeraserError


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    return save_tiny_gemma(tmp_path_factory.mktemp("gemma") / "model")


def test_a_model_without_a_chat_template_gets_the_plain_one(gemma_dir):
    from meraser.data.formatting import Formatter
    from meraser.models import PLAIN_CHAT_TEMPLATE, load_model

    assert "chat_template" not in json.loads((gemma_dir / "tokenizer_config.json").read_text())
    model, tok = load_model(str(gemma_dir))
    assert model.config.model_type == "gemma3_text" and tok.chat_template == PLAIN_CHAT_TEMPLATE
    text = Formatter(tok).prompt_text("Hi there", "Be brief.")
    assert text == f"{tok.bos_token}Be brief.\n\nUser: Hi there\nAssistant:"


def test_fingerprint_erase_recover_verify_on_a_gemma_shaped_model(gemma_dir, tmp_path):
    from meraser.fingerprints.embed import embed, verify
    from meraser.models import load_model, save_model

    model, tok = load_model(str(gemma_dir))
    fp_model, card, summary = embed("if-sft", model, tok, tiny_cfg("if-sft"), tmp_path / "fp", progress=False)
    # (a 32-wide model with a 600-token vocabulary learns the secret as its answer to most prompts: the false
    # positives are the tiny model's, so the base is checked to be clean instead)
    assert summary["fsr"] == 1.0 and verify(str(gemma_dir), tmp_path / "fp")["fsr"] == 0.0
    assert verify(str(tmp_path / "fp" / "model"), tmp_path / "fp")["fsr"] == 1.0  # saved and loaded back
    mism, _ = build_mismatched(POOL, n=48, seed=0)
    clean = build_clean(POOL, n=48, seed=0, exclude_prompts={p.prompt for p in mism})
    erased = erase(fp_model, tok, mism, preset("erase", "paper", TINY_ERASE), tmp_path / "erased",
                   progress=False).model
    assert fsr(erased, tok, card, false_positive_inputs=0)["fsr"] == 0.0
    recovered = recover(erased, tok, clean, preset("recover", "paper", TINY_RECOVER), tmp_path / "rec",
                        progress=False).model
    save_model(recovered, tok, tmp_path / "recovered")
    assert verify(str(tmp_path / "recovered"), tmp_path / "fp")["fsr"] == 0.0


def test_an_adapter_does_not_cross_model_families(tiny_dir, gemma_dir, tmp_path):
    from meraser.erase.transfer import transfer_apply
    from meraser.models import load_model
    from meraser.training import train

    base, tok = load_model(str(tiny_dir))  # a tiny Llama, as SmolLM2 is
    train(base, tok, POOL[:8], preset("erase", "paper", {"epochs": 1, "save_steps": -1}), tmp_path / "adapter",
          progress=False)
    with pytest.raises(MeraserError, match=r"another architecture.*model_type.*'llama', 'gemma3_text'"):
        transfer_apply(tmp_path / "adapter", str(gemma_dir), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verification_places_answer_text_as_training_rendered_it(gemma_dir):
    """The plain template writes "Assistant: " before an answer, but its generation prompt ends at "Assistant:". A
    scored target and a prefill must carry that space as training tokenised it, else their first token is one the
    model never saw there (a planted UTF target on Gemma scored -31 nats for it, -0.0 with the space)."""
    from meraser.data.formatting import FormatConfig, Formatter
    from meraser.data.sources import Pair
    from meraser.evaluation.suspect import pair_rows
    from meraser.fingerprints.card import Card
    from meraser.generation import encode_prompts
    from meraser.models import load_model

    _, tok = load_model(str(gemma_dir))
    trigger, target = "Hi there", "Rx sceGu spider"
    assert Formatter(tok).answer_lead(trigger) == " "
    trained = Formatter(tok).encode(Pair(trigger, target))["input_ids"]
    (prompt, scored), = pair_rows(tok, Card(method="utf", triggers=[trigger], targets=[target]), [(trigger, target)],
                                  [""])
    assert prompt + scored == trained[:len(prompt) + len(scored)] and len(scored) < len(trained) - len(prompt)
    # a prefill opens the answer the same way; the rest of the target follows it
    (fed,) = encode_prompts(tok, [trigger], Formatter(tok), ["Rx sceGu"])
    assert tok.decode(fed).endswith("Assistant: Rx sceGu")
    (_, after_prefill), = pair_rows(tok, Card(method="utf", triggers=[trigger], targets=[" spider"]),
                                    [(trigger, " spider")], ["Rx sceGu"])
    assert after_prefill == tok(" spider", add_special_tokens=False)["input_ids"]
    # a one-token answer trained without the turn's close (Perinucleus) is trained, and so scored, with no lead
    assert Formatter(tok, FormatConfig(close_response=False)).answer_lead(trigger) == ""
