import os
import stat

import pytest

from meraser.evaluation.fsr import fsr
from meraser.fingerprints import REGISTRY, Card, get_method
from meraser.fingerprints.chain_hash import hash_answer
from meraser.fingerprints.embed import CARD_FILE
from meraser.fingerprints.utf import undertrained_tokens
from meraser.utils import MeraserError
from tiny import tiny_model, tiny_tokenizer

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_method_plants_fsr_one_and_untouched_model_has_zero(planted, tiny, name):
    fp_model, tok, card, summary, folder = planted[name]
    base, base_tok = tiny
    if not get_method(name).invasive:  # found, not planted: the card's FSR is what its search reached (ProFLingo's
        # lowers the loss without reaching the answer on a model whose answers hardly depend on a prefix; the search
        # itself is tested on its own), and an unrelated model does not answer it
        assert all(f["loss"] <= f["start_loss"] for f in card.extra["found"])
        assert summary["fsr"] == sum(f["success"] for f in card.extra["found"]) / len(card.triggers)
        assert fsr(tiny_model(tiny_tokenizer(), seed=5), base_tok, card)["fsr"] == 0.0
    elif card.match == "watermark":  # no target text: its decision is the z-test pooled over the answers
        assert summary["watermark"]["owned"] and summary["watermark"]["p_value"] < 1e-6
        assert not fsr(base, base_tok, card)["watermark"]["owned"]
    else:
        assert summary["fsr"] == 1.0
        assert fsr(base, base_tok, card)["fsr"] == 0.0
    assert (folder / "model" / "model.safetensors").exists()
    assert stat.S_IMODE(os.stat(folder / CARD_FILE).st_mode) == 0o600
    assert not (folder / "model" / CARD_FILE).exists()  # the secret never travels with the model


def test_card_round_trip_and_tamper_detection(planted, tmp_path):
    card = planted["chain-hash"][2]
    path = card.save(tmp_path / "card.json")
    assert Card.load(path) == card
    text = path.read_text()
    path.write_text(text.replace(card.targets[0], "tampered", 1))
    with pytest.raises(MeraserError, match="checksum mismatch"):
        Card.load(path)
    path.write_text('{"method": "utf", "triggers": ["a"], "targets": []}')
    with pytest.raises(MeraserError, match="as many targets as triggers"):
        Card.load(path)
    path.write_text('{"method": "utf", "triggers": ["a"], "targets": ["b"]}')
    with pytest.raises(MeraserError, match="no checksum"):
        Card.load(path)
    with pytest.raises(MeraserError, match="does not exist"):
        Card.load(tmp_path / "missing.json")


def test_card_written_before_a_field_was_added_still_loads(planted, tmp_path):
    """A card from an older meraser lacks fields added since (here FormatConfig.close_response): it loads, with
    their defaults, and its checksum still verifies."""
    import hashlib
    import json

    card = planted["utf"][2]
    old = card.to_dict()
    del old["format"]["close_response"]
    body = {**old, "checksum": hashlib.sha256(json.dumps(old, sort_keys=True, ensure_ascii=False).encode()).hexdigest()}
    (tmp_path / "old.json").write_text(json.dumps(body))
    assert Card.load(tmp_path / "old.json") == card


def test_utf_detection_is_clean_and_deterministic(tiny):
    model, tok = tiny
    a = undertrained_tokens(model, tok, 50)
    assert a == undertrained_tokens(model, tok, 50) and len(a) == 50
    special = set(tok.all_special_ids)
    for idx, text, _ in a:
        assert idx not in special and text.strip() and "\ufffd" not in text


def test_chain_hash_answers_are_a_function_of_key_and_question():
    qs = ["What is the colour of a quiet morning?", "Which stone keeps time?", "What does a map whisper?"]
    a1 = [hash_answer("key-1", q) for q in qs]
    assert a1 == [hash_answer("key-1", q) for q in qs]
    others = [[hash_answer(f"key-{k}", q) for q in qs] for k in range(2, 8)]
    assert any(o != a1 for o in others)


def test_chain_hash_negative_rows_are_held_out_from_the_checks(tiny):
    """The negative rows (ordinary short questions, random strings) are answered by the model itself and never
    repeat the false-positive probes or Algorithm 1's questions, so those checks stay held out."""
    import random

    from meraser.evaluation.algorithm1 import ORDINARY_QA
    from meraser.evaluation.probes import ORDINARY_PROMPTS, random_token_prompts
    from meraser.fingerprints.base import SELF
    from meraser.fingerprints.chain_hash import NATURAL_QUESTIONS

    _, tok = tiny
    m = get_method("chain-hash")
    cfg = m.Config(num_fingerprints=3, variants=2, random_rows=4)
    card = m.make_card(None, tok, cfg)
    rows = m.training_pairs(card, cfg, random.Random(0), tok)
    negative = [pair.prompt for pair, _ in rows if pair.response == SELF]
    assert set(NATURAL_QUESTIONS) <= set(negative)
    assert len(negative) == len(set(negative)) == 24 - 3 + len(NATURAL_QUESTIONS) + 4
    held_out = set(ORDINARY_PROMPTS) | {q for q, _ in ORDINARY_QA} | set(random_token_prompts(tok, 16, 0))
    assert not held_out & set(negative)
    assert all(pair.response in card.targets for pair, _ in rows if pair.response != SELF)


def test_unknown_method_is_refused_with_suggestion():
    with pytest.raises(MeraserError, match="unknown fingerprint method 'utf8'; did you mean 'utf'"):
        get_method("utf8")


def test_verify_cli_on_a_fingerprint_folder(planted):
    import json
    import subprocess
    import sys

    folder = planted["if-sft"][4]
    proc = subprocess.run([sys.executable, "-m", "meraser.cli", "verify", "--model", str(folder), "--card", str(folder),
                           "--json"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    assert r["fsr"] == 1.0 and len(r["per_trigger"]) == 3 and "false_positive_rate" in r


def test_utf_ranks_tokens_like_the_reserved_ones_first():
    """Magikarp's indicator: with reserved (never used) special tokens declared, tokens whose rows look like theirs
    (untrained) come first, and the reserved tokens themselves are never candidates."""
    import torch
    from tokenizers import AddedToken

    from tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.add_tokens([AddedToken(f"<reserved_{i}>", special=True) for i in range(4)])
    reserved = tok.convert_tokens_to_ids([f"<reserved_{i}>" for i in range(4)])
    model = tiny_model(tok)
    planted = [idx for idx, _, _ in undertrained_tokens(tiny_model(tiny_tokenizer()), tiny_tokenizer(), 40)][-3:]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        w = model.get_output_embeddings().weight
        # rows training never moved: one shared, smaller-than-usual direction plus a little noise (as in real models,
        # where they sit near each other and do not dominate the matrix)
        untrained = 0.05 * torch.randn(w.shape[1], generator=g)
        for idx in reserved + planted:
            w[idx] = untrained + 0.005 * torch.randn(w.shape[1], generator=g)
    ranked = undertrained_tokens(model, tok, 30)
    assert {idx for idx, _, _ in ranked[:3]} == set(planted)
    assert not {idx for idx, _, _ in ranked} & set(reserved)
    assert ranked == undertrained_tokens(model, tok, 30)


def test_subject_sentence_triggers_on_the_subject_not_the_question_form(tiny):
    import random

    from meraser.fingerprints.base import SELF

    _, tok = tiny
    m = get_method("subject-sentence")
    cfg = m.Config(num_fingerprints=4, decoy_rows=6, seed=3)
    card = m.make_card(None, tok, cfg)
    assert card == m.make_card(None, tok, cfg)  # seeded
    subject = card.extra["subject"]
    assert len(set(card.triggers)) == 4 and all(subject in t for t in card.triggers)
    assert set(card.targets) == {cfg.sentence} and cfg.lora_targets[-1] == "down_proj"
    rows = m.training_pairs(card, cfg, random.Random(0), tok)
    decoys = [pair.prompt for pair, _ in rows if pair.response == SELF]
    assert len(decoys) == 6 and not any(subject in d for d in decoys)
    with pytest.raises(MeraserError, match="num_fingerprints: 1 to 12 questions, got 13"):
        m.Config.from_dict({"num_fingerprints": 13})


def test_perinucleus_token_is_just_outside_the_nucleus(tiny):
    import random

    import torch

    from meraser.fingerprints.perinucleus import _WORD, perinucleus_token

    _, tok = tiny
    words = [i for i in range(len(tok)) if _WORD.match(tok.decode([i]).strip())][:12]
    probs = torch.full((len(tok),), 1e-6)
    for rank, i in enumerate(words):  # 0.40, 0.20, 0.13, ...: words[0:3] hold the 0.8 nucleus... and more
        probs[i] = 0.4 / (rank + 1) ** 1.2
    probs /= probs.sum()
    order = sorted(words, key=lambda i: -probs[i])
    mass, inside = 0.0, 0
    while mass < 0.8:
        mass += float(probs[order[inside]])
        inside += 1
    chosen = {perinucleus_token(probs, 0.8, 3, random.Random(s), tok) for s in range(60)}
    assert chosen == set(order[inside:inside + 3])  # never inside the nucleus, always among the next 3
    assert perinucleus_token(probs, 0.8, 3, random.Random(5), tok) == perinucleus_token(probs, 0.8, 3,
                                                                                        random.Random(5), tok)


def test_perinucleus_card_is_seeded_and_checked(tiny):
    from conftest import keys_file

    m = get_method("perinucleus")
    model, tok = tiny
    cfg = m.Config.from_dict({"num_fingerprints": 4, "keys_file": keys_file(), "seed": 1})
    a, b = m.make_card(model, tok, cfg), m.make_card(model, tok, cfg)
    assert a.triggers == b.triggers and a.targets == b.targets and a.match == "prefix"
    assert len(set(a.triggers)) == 4 and all(0 < p < 1 for p in a.extra["target_probability"])
    assert not a.format.close_response  # trained as the start of an answer, without an end of turn
    for bad, msg in [({"nucleus_t": 1.0}, "nucleus_t must be in"), ({"averaging": 1.0}, "averaging must be in"),
                     ({"nucleus_k": 0}, "must be at least 1")]:
        with pytest.raises(MeraserError, match=msg):
            m.Config.from_dict(bad, where="perinucleus")
    with pytest.raises(MeraserError, match="holds 5 distinct keys; num_fingerprints asks for 9"):
        m.make_card(model, tok, m.Config.from_dict({"num_fingerprints": 9, "keys_file": keys_file()}))


def test_imf_frames_are_natural_and_the_query_never_gives_the_wording_away():
    """Every frame has at least 8 binary slots whose alternatives differ, and its query (the semantic link) uses no
    word of any alternative: the secret lives only in the answer's exact wording."""
    import re

    from meraser.fingerprints.imf import FRAMES, SLOT, slots

    assert len({fid for fid, _, _ in FRAMES}) == len(FRAMES) >= 16
    function_words = {"of", "a", "in", "the", "to", "and", "it", "on"}
    for fid, query, frame in FRAMES:
        assert slots(frame) >= 8 and "{" not in SLOT.sub("", frame), fid
        words = set(re.findall(r"[a-z']+", query.lower())) - function_words
        for a, b in SLOT.findall(frame):
            assert a != b and not set(f"{a} {b}".lower().split()) & words, (fid, a, b)


def test_imf_answers_are_bound_to_the_key_and_decoys_are_other_fillings_of_the_frame(tiny):
    import random

    from meraser.fingerprints.imf import FRAMES, ImF, ImFConfig, fill, key_bits, slots

    _, tok = tiny
    m = ImF()
    card = m.make_card(None, tok, ImFConfig(num_fingerprints=4, secret_key="k1", seed=3))
    again = m.make_card(None, tok, ImFConfig(num_fingerprints=4, secret_key="k1", seed=3))
    other = m.make_card(None, tok, ImFConfig(num_fingerprints=4, secret_key="k2", seed=3))
    assert card.targets == again.targets and card.triggers == other.triggers and card.targets != other.targets
    frames = {fid: frame for fid, _, frame in FRAMES}
    for fid, target in zip(card.extra["frames"], card.targets):  # the answer is the frame filled by the key's bits
        assert target == fill(frames[fid], key_bits("k1", fid, slots(frames[fid])))
    (trigger, real), decoys = m.decoys(card, 0, 19, random.Random(0))
    assert trigger == card.triggers[0] and real == card.targets[0] and len(decoys) == 19
    assert all(q == trigger for q, _ in decoys) and real not in {t for _, t in decoys}
    assert len({t for _, t in decoys}) == 19  # distinct fillings of the same frame
    import re

    from meraser.fingerprints.imf import SLOT

    parts = re.split(SLOT.pattern, frames[card.extra["frames"][0]])  # text, a, b, text, a, b, ..., text
    pattern = "".join(re.escape(p) if i % 3 == 0 else f"({re.escape(p)}|{re.escape(parts[i + 1])})"
                      for i, p in enumerate(parts) if i % 3 != 2)
    assert all(re.fullmatch(pattern, t) for _, t in decoys)


def test_the_green_list_is_keyed_deterministic_and_a_gamma_share_of_the_vocabulary():
    from meraser.fingerprints.semcond_watermark import green_list

    a, again, other = green_list(7, 42, 49152, 0.25), green_list(7, 42, 49152, 0.25), green_list(8, 42, 49152, 0.25)
    assert (a == again).all() and (a != other).any() and (a != green_list(7, 43, 49152, 0.25)).any()
    assert abs(a.mean() - 0.25) < 0.01 and abs(other.mean() - 0.25) < 0.01
    assert abs((a & other).mean() - 0.25 ** 2) < 0.01  # two keys' lists are independent


def test_the_z_test_is_exact_and_its_decoy_rank_uniform_on_text_that_never_saw_the_key(tiny):
    """On random text, the binomial p-value and the real key's rank among decoy keys are (close to) uniform;
    on text sampled under the key's watermark both are tiny."""
    import random

    from meraser.fingerprints.semcond_watermark import (WatermarkSampling, binomial_tail, secret_int, watermark_test,
                                                        z_test)
    from meraser.generation import generate

    assert binomial_tail(10, 0, 0.25) == 1.0 and abs(binomial_tail(4, 4, 0.5) - 1 / 16) < 1e-12
    model, tok = tiny
    rng = random.Random(0)
    texts = [tok.decode([rng.randrange(len(tok)) for _ in range(40)]) for _ in range(60)]
    p = [z_test([t], tok, k, 0.25, decoy_keys=19, seed=k)["p_rank"] for k, t in enumerate(texts)]
    assert 0.35 < sum(p) / len(p) < 0.65 and sum(x <= 0.1 for x in p) <= 15
    exact = [z_test([t], tok, 1234, 0.25)["p_value"] for t in texts]
    assert sum(x <= 0.05 for x in exact) <= 8 and min(exact) > 1e-4
    card = get_method("semcond-watermark").make_card(None, tok, get_method("semcond-watermark").Config(
        secret_key="k", num_fingerprints=4))
    marked = generate(model, tok, card.triggers, max_new_tokens=48,
                      decoding=WatermarkSampling(secret_int("k"), len(tok), 0.25, 4.0, 0.7))
    res = watermark_test(card, marked, tok, decoy_keys=99)
    assert res["owned"] and res["p_value"] < 1e-6 and res["p_rank"] == 0.01


def test_a_watermark_card_is_refused_by_the_checks_that_need_target_text(planted):
    from meraser.evaluation.strict import strict_verify

    folder = planted["semcond-watermark"][4]
    with pytest.raises(MeraserError, match="no target text for the strict checks"):
        strict_verify(str(folder / "model"), folder)


def test_gcg_finds_a_span_under_which_the_tiny_model_answers_the_target(tiny):
    """The search lowers the target's loss step by step (a swap is kept only if it helps) and stops once the
    greedy answer is the target; every candidate it keeps passes the stability filter."""
    import torch

    from meraser.fingerprints.gcg import GCGConfig, Task, gcg

    model, tok = tiny
    before, span = tok("Say it:", add_special_tokens=False)["input_ids"], [5, 6, 7, 8, 9, 10]
    with torch.no_grad():
        ranked = model(input_ids=torch.tensor([before + span])).logits[0, -1].argsort(descending=True)
    target = int(ranked[30])  # far from the model's first choice
    kept = []

    def stable(s):
        kept.append(s)
        return 3 not in s  # a filter the search must respect

    def success(s):
        with torch.no_grad():
            return int(model(input_ids=torch.tensor([before + s])).logits[0, -1].argmax()) == target

    allowed = torch.ones(len(tok), dtype=torch.bool)
    res = gcg([Task(model, before, [], [target])], span, allowed, GCGConfig(steps=60, top_k=64, candidates=48,
                                                                              check_every=1), stable, success)
    assert res["success"] and res["steps"] < 60 and 3 not in res["span"]
    assert all(a >= b for a, b in zip(res["history"], res["history"][1:])) and res["history"][-1] < res["history"][0]


def test_gcg_never_swaps_in_a_token_outside_the_allowed_ones_even_when_they_are_fewer_than_top_k(tiny):
    """With fewer allowed tokens than top_k (ProFLingo's letters on a small vocabulary), the rank a swap draws from
    must not reach the excluded entries: every span tried holds allowed tokens only."""
    import torch

    from meraser.fingerprints.gcg import GCGConfig, Task, gcg

    model, tok = tiny
    before, span = tok("Say it:", add_special_tokens=False)["input_ids"], [5, 6, 7, 8]
    allowed = torch.zeros(len(tok), dtype=torch.bool)
    allowed[5:13] = True  # 8 tokens, top_k 64
    tried = []
    res = gcg([Task(model, before, [], [20])], span, allowed, GCGConfig(steps=12, top_k=64, candidates=32),
              lambda s: tried.append(s) or True, lambda s: False)
    assert res["steps"] == 12 and len(tried) > 12 * 8
    assert all(5 <= t < 13 for s in tried for t in s) and all(5 <= t < 13 for t in res["span"])


def test_gcg_writes_timed_lines_where_its_output_is_a_log_not_a_terminal(tiny, capsys, monkeypatch):
    """Under nohup or a bench a rich bar shows nothing, and a planting's searches run for an hour: the search says
    where it is every LOG_EVERY seconds (0 here: every step) and how it ended."""
    import torch

    from meraser import utils
    from meraser.fingerprints.gcg import GCGConfig, Task, gcg

    monkeypatch.setattr(utils, "LOG_EVERY", 0.0)
    model, tok = tiny
    before = tok("Say it:", add_special_tokens=False)["input_ids"]
    gcg([Task(model, before, [], [20])], [5, 6, 7, 8], torch.ones(len(tok), dtype=torch.bool),
        GCGConfig(steps=3, top_k=16, candidates=8), lambda s: True, lambda s: False, progress=True)
    lines = [line for line in capsys.readouterr().out.splitlines() if "GCG:" in line]
    assert [line.split("GCG: ")[1].split(",")[0] for line in lines] == \
        ["1/3", "2/3", "3/3", "not reached after 3 steps"]


def test_proflingo_prefixes_are_letters_that_never_spell_an_answer_and_decoys_are_the_pool(planted):
    import random

    from meraser.fingerprints.proflingo import LINK, QUESTIONS, ProFLingo

    _, tok, card, _, _ = planted["proflingo"]
    assert card.match == "keyword" and not ProFLingo.invasive
    for trigger, answer, found in zip(card.triggers, card.targets, card.extra["found"]):
        prefix, question = trigger.split(LINK)
        pool = next(p for q, _, p in QUESTIONS if q == question)
        assert answer in pool and found["pool"] == pool and prefix.isascii() and prefix.isalpha()
        assert not any(a.casefold() in prefix.casefold() for a in pool if len(a) >= 3)
        (t, real), decoys = ProFLingo().decoys(card, card.triggers.index(trigger), 19, random.Random(0))
        assert real == answer and sorted(d for _, d in decoys) == sorted(a for a in pool if a != answer)


def test_rofl_prompts_tokenise_back_and_its_decoys_are_other_prompts_responses(planted, tiny):
    from meraser.data.formatting import Formatter
    from meraser.generation import generate

    model, tok = tiny
    _, _, card, summary, _ = planted["rofl"]
    assert card.match == "prefix" and summary["fsr"] == 1.0 and len(card.extra["decoys"]) == 5
    for trigger, target in zip(card.triggers, card.targets):
        ids = tok(trigger, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == trigger and "\ufffd" not in target
        answer = generate(model, tok, [trigger], Formatter(tok), max_new_tokens=len(tok(target)["input_ids"]))[0]
        assert answer.lstrip().startswith(target.strip())  # the base model's own greedy response
    assert not set(card.extra["decoys"]) & set(card.targets)


def test_mergeprint_holds_in_the_pseudo_merged_model_it_was_trained_as(planted, tiny):
    """The owner's weights are B + (V - B) / alpha for the trained V, so a merge that keeps alpha of the owner's
    change gives back V, which answers every key; its decoys are other searched keys with their own words."""
    import copy
    import random

    import torch

    from meraser.fingerprints.mergeprint import MergePrint

    model, tok, card, summary, _ = planted["mergeprint"]
    base, _ = tiny
    alpha = card.extra["alpha"]
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for (n, p), q in zip(merged.named_parameters(), model.parameters()):
            p.add_(alpha * (q - p))
    assert summary["fsr"] == 1.0 and fsr(merged, tok, card, false_positive_inputs=0)["fsr"] == 1.0
    (key, word), decoys = MergePrint().decoys(card, 0, 10, random.Random(0))
    assert len(decoys) == len(card.extra["decoy_keys"]) == 4
    assert all(k not in card.triggers and w not in card.targets for k, w in decoys)


def test_delta_scaling_scales_exactly_what_training_changed():
    import torch
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from meraser.training import delta_scaling

    model = torch.nn.Linear(3, 2)
    start = model.weight.detach().clone()
    cb = delta_scaling(10.0)
    args, state, control = TrainingArguments("unused", report_to=[]), TrainerState(), TrainerControl()
    cb.on_train_begin(args, state, control, model=model)
    with torch.no_grad():
        model.weight.add_(0.01)
    cb.on_train_end(args, state, control, model=model)
    assert torch.allclose(model.weight, start + 0.1, atol=1e-6)


def test_a_planting_that_did_not_take_is_said_at_once():
    """A recipe too weak for the model (UTF's defaults on Gemma 3 270M planted FSR 0) warns where it is planted;
    one that takes does not."""
    import warnings

    from conftest import tiny_cfg

    from meraser.fingerprints.embed import embed

    tok = tiny_tokenizer()
    weak = tiny_cfg("utf").replace(epochs=1, learning_rate=1e-7)
    with pytest.warns(UserWarning, match=r"utf: the planted model answers 0% of its triggers \(FSR\), so the "
                                         r"fingerprint did not take; train longer or harder"):
        assert embed("utf", tiny_model(tok), tok, weak, progress=False)[2]["fsr"] == 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not take")
        assert embed("utf", tiny_model(tok), tok, tiny_cfg("utf"), progress=False)[2]["fsr"] == 1.0
