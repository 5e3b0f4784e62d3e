"""Decoding-time attacks through the one decoding hook: plain greedy is unchanged, CleanGen with the suspect as its
own reference changes nothing and with the clean base suppresses a planted target, Token Forcing extracts a planted
target and its filter blocks it; their commands write no model; bad settings are refused before any work."""

import json

import pytest
import torch
import yaml
from tiny import POOL, tiny_model, tiny_tokenizer

from meraser.attacks.decoding import CleanGenDecoding, TokenForcingConfig, expand, scan_vocabulary
from meraser.evaluation.fsr import fsr
from meraser.evaluation.probes import ORDINARY_PROMPTS
from meraser.generation import GREEDY, generate
from meraser.models import load_model


def test_greedy_through_the_hook_equals_one_prompt_at_a_time_generate(planted):
    model, tok = planted["if-sft"][0], planted["if-sft"][1]
    prompts = ORDINARY_PROMPTS[:6] + planted["if-sft"][2].triggers
    batched = generate(model, tok, prompts, max_new_tokens=12, batch_size=4, decoding=GREEDY)
    assert batched == generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    for prompt, text in zip(prompts, batched):  # no padding at all: the reference answer
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert text == tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("k", [1, 4])
def test_cleangen_with_the_suspect_as_reference_changes_nothing(planted, k):
    model, tok, card = planted["utf"][0], planted["utf"][1], planted["utf"][2]
    prompts = ORDINARY_PROMPTS[:5] + card.triggers
    decoding = CleanGenDecoding(model, k=k, alpha=20)
    assert generate(model, tok, prompts, max_new_tokens=16, batch_size=3, decoding=decoding) == \
        generate(model, tok, prompts, max_new_tokens=16, batch_size=3)
    assert decoding.replaced == 0 and decoding.generated > 0


@pytest.mark.parametrize("method", ["utf", "chain-hash"])
def test_cleangen_against_the_clean_base_suppresses_the_planted_target(planted, tiny_dir, method):
    model, tok, card = planted[method][0], planted[method][1], planted[method][2]
    assert fsr(model, tok, card, false_positive_inputs=0)["fsr"] == 1.0
    base, _ = load_model(str(tiny_dir))
    decoding = CleanGenDecoding(base, k=4, alpha=20)
    assert fsr(model, tok, card, false_positive_inputs=0, decoding=decoding)["fsr"] == 0.0
    assert decoding.replaced >= len(card.triggers)


def test_cleangen_decodes_a_mixed_batch_as_it_decodes_each_prompt_alone(planted):
    """Rows that get tokens replaced and rows that do not share one batch and one pair of KV caches: the masked
    tails and per-row positions must leave every row as it would be alone. The reference is another trained model
    (the UTF one): the untrained tiny base has near-flat logits, whose argmax padding noise alone can flip."""
    model, tok, card = planted["chain-hash"][0], planted["chain-hash"][1], planted["chain-hash"][2]
    base = planted["utf"][0]
    prompts = card.triggers + ORDINARY_PROMPTS[:5]
    batched = CleanGenDecoding(base, k=3, alpha=20)
    together = generate(model, tok, prompts, max_new_tokens=20, batch_size=len(prompts), decoding=batched)
    assert batched.replaced > 0
    alone = [generate(model, tok, [p], max_new_tokens=20, decoding=CleanGenDecoding(base, k=3, alpha=20))[0]
             for p in prompts]
    assert together == alone


def test_token_forcing_extracts_the_planted_target_and_its_filter_blocks_it(planted, tmp_path, cli):
    model, tok, card, folder = planted["utf"][0], planted["utf"][1], planted["utf"][2], planted["utf"][4]
    # the tiny model memorises its target after a few seconds of training, less surely than a 135M model after
    # minutes: its first continuation token comes at p~0.45, so the threshold is lowered from 0.95
    settings = {"context": "assistant", "threshold": 0.8}
    kept = scan_vocabulary(model, tok, TokenForcingConfig(batch_size=128, **settings))
    target = tok(card.targets[0], add_special_tokens=False)["input_ids"]
    assert target[0] in [t for t, _ in kept]
    sequences = expand(model, tok, [t for t, _ in kept], 20, "assistant")
    assert any(card.targets[0] in tok.decode(s) for s in sequences)  # the whole target came out unprompted
    assert not scan_vocabulary(model, tok, TokenForcingConfig(batch_size=128))  # after [BOS, t] it does not

    code, out, err = cli("attack", "--method", "token-forcing", "--model", folder, "--out", tmp_path / "tf", "--json",
                         *[f"--set={k}={v}" for k, v in settings.items()])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "tf").iterdir()) == ["attack.json", "extracted.jsonl"]  # no model
    # the extracted sequences may quote the target: only their owner may read them (umask 022 gave 0644 before)
    assert all(p.stat().st_mode & 0o077 == 0 for p in (tmp_path / "tf").iterdir())
    code, out, err = cli("verify", "--model", folder, "--card", folder, "--attack", "token-forcing", "--set",
                         f"sequences={tmp_path / 'tf' / 'extracted.jsonl'}", "--json")
    assert code == 0, err
    assert json.loads(out)["fsr"] == 0.0 and json.loads(out)["attack"] == "token-forcing"


def test_vocabulary_scan_keeps_what_scoring_every_token_keeps(planted):
    """The scan's first pass drops tokens by a bound on their score: it must drop none that scoring all would keep."""
    import torch

    from meraser.attacks.decoding import _greedy_scores, context_ids
    from meraser.models import autocast, encode_prefix

    model, tok = planted["utf"][0], planted["utf"][1]
    vocab = [t for t in range(len(tok)) if t not in set(tok.all_special_ids)]
    for settings in ({"context": "assistant", "threshold": 0.8, "placeholder": False}, {"context": "assistant",
                     "threshold": 0.5}, {"context": "bos", "threshold": 0.3, "steps": 2}):
        cfg = TokenForcingConfig(batch_size=128, **settings)
        with torch.no_grad(), autocast(model):
            every = _greedy_scores(model, encode_prefix(model, context_ids(tok, cfg.context)), vocab, cfg,
                                   tok.eos_token_id, None)
        kept = scan_vocabulary(model, tok, cfg)
        assert kept and len(kept) < len(vocab)  # the setting keeps some tokens and drops others
        assert dict(kept) == pytest.approx(dict(every), abs=2e-3)


def test_decoding_attack_stage_reports_perplexity_as_not_applicable(planted, tmp_path):
    from meraser.runner import load_experiment, run_experiment

    text = tmp_path / "text.txt"
    text.write_text(" ".join(p.response for p in POOL))
    exp = {"out": str(tmp_path / "run"), "fingerprint": {"existing": str(planted["utf"][4])},
           "eval": {"false_positive_inputs": 4, "ppl": str(text), "ppl_windows": 2, "ppl_window": 32},
           "attack": {"method": "cleangen"}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    rows = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)
    fingerprinted, attacked = rows[-2], rows[-1]
    assert fingerprinted["fsr"] == 1.0 and isinstance(fingerprinted["ppl"], dict)
    assert attacked["fsr"] == 0.0 and attacked["decoding"] == "cleangen"
    assert attacked["ppl"] == "not applicable under a decoding attack"
    assert (tmp_path / "run" / "attacked" / "attack.json").exists()
    assert not (tmp_path / "run" / "attacked" / "model.safetensors").exists()
    again = run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)  # resumes, evaluates nothing
    assert again[-1] == attacked


def _other_tokenizer_model(tmp_path):
    tok = tiny_tokenizer()
    tok.add_tokens(["<extra-token>"])
    m = tiny_model(tok)
    m.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    return tmp_path / "other"


BAD = [
    (["--attack", "cleangen", "--set", "k=0"], "k must be at least 1, got 0"),
    (["--attack", "cleangen", "--set", "alpha=1"], "alpha must be above 1"),
    (["--attack", "token-forcing", "--set", "threshold=1.5"], "threshold must be in (0, 1], got 1.5"),
    (["--attack", "token-forcing", "--set", "threshold=0"], "threshold must be in (0, 1], got 0"),
    (["--attack", "token-forcing", "--set", "context=asistant"], "unknown context 'asistant'; did you mean "
                                                                 "'assistant'?"),
    (["--attack", "cleangn"], "unknown attack 'cleangn'; did you mean 'cleangen'?"),
    (["--attack", "prune-magnitude"], "prune-magnitude changes weights, not decoding"),
    (["--attack", "cleangen", "--set", "reference={other}"], "has another tokenizer (586 tokens against the "
                                                              "suspect's 585"),
    (["--attack", "suppress-topk", "--set", "top_k=0"], "top_k must be at least 1, got 0"),
    (["--attack", "detect-topk", "--set", "threshold=1"], "threshold must be in [0, 1), got 1"),
    (["--attack", "suppress-lookahead", "--set", "beam_width=0"], "beam_width must be at least 1, got 0"),
    (["--attack", "suppress-bigram", "--set", "calibration_texts=1"], "calibration_texts must be at least 2"),
    (["--attack", "suppress-bigram", "--set", "calibration={other}"], "has another tokenizer (586 tokens against "
                                                                      "the suspect's 585"),
    (["--attack", "perplexity-filter", "--set", "threshold=0.5"], "threshold must be above 1 (a perplexity)"),
    (["--attack", "supress-topk"], "unknown attack 'supress-topk'; did you mean 'suppress-topk'?"),
]


@pytest.mark.parametrize("argv,fragment", BAD, ids=[b[1][:30] for b in BAD])
def test_bad_decoding_attack_input_is_refused(planted, tmp_path, cli, argv, fragment):
    folder = planted["utf"][4]
    argv = [a.replace("{other}", str(_other_tokenizer_model(tmp_path))) for a in argv]
    code, _, err = cli("verify", "--model", folder, "--card", folder, *argv)
    assert code == 2 and fragment in err and "Traceback" not in err
