"""The adaptive decoding suite of Nasery et al. 2025 through the one decoding hook: each attack changes exactly the
steps and tokens its rule names and leaves the rest greedy; it takes the planted target out of the tiny models'
answers; a mixed batch decodes as each prompt alone; bad settings are refused before any work."""

import pytest
import torch

from meraser.attacks.bigram import BigramConfig, BigramSuppression, _clip_and_combine, pair_scores
from meraser.attacks.perplexity_filter import PerplexityFilterConfig, PerplexityFiltering, prompt_perplexities
from meraser.attacks.suppression import (DetectTopKConfig, LookaheadConfig, LookaheadSuppression, NeighbourConfig,
                                         NeighbourSuppression, TopKConfig, TopKSuppression, normalised_tokens)
from meraser.data.formatting import Formatter
from meraser.evaluation.fsr import fsr
from meraser.evaluation.probes import ORDINARY_PROMPTS
from meraser.generation import GREEDY, generate
from meraser.utils import MeraserError


def _ids(tok, prompt):
    ids = torch.tensor([Formatter(tok).encode_prompt(prompt)])
    return ids, torch.ones_like(ids)


def _decode(decoding, model, tok, prompt, n=4):
    ids, mask = _ids(tok, prompt)
    with torch.no_grad():
        return decoding.new_tokens(model, ids, mask, max_new_tokens=n, pad_id=tok.pad_token_id,
                                   eos_id=tok.eos_token_id)[0].tolist()


def _first_probs(model, tok, prompt):
    ids, _ = _ids(tok, prompt)
    with torch.no_grad():
        return torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)


def _prompts(planted, method):
    return planted[method][2].triggers + ORDINARY_PROMPTS[:4]


@pytest.mark.parametrize("k", [1, 3])
def test_suppress_topk_removes_the_top_k_at_the_first_step_only(planted, k):
    model, tok = planted["chain-hash"][0], planted["chain-hash"][1]
    for prompt in _prompts(planted, "chain-hash"):
        got = _decode(TopKSuppression(tok, TopKConfig(top_k=k)), model, tok, prompt)
        assert got[0] not in _first_probs(model, tok, prompt).topk(k).indices.tolist()
        ids, mask = _ids(tok, prompt)  # after the first step: plain greedy from the suppressed first token
        rest = GREEDY.new_tokens(model, torch.cat([ids, torch.tensor([[got[0]]])], 1), torch.ones(1, ids.shape[1] + 1,
                                 dtype=torch.long), max_new_tokens=3, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        assert got[1:] == rest[0].tolist()[:len(got) - 1]


def test_detect_topk_acts_only_where_the_top_token_passes_the_threshold(planted):
    model, tok = planted["utf"][0], planted["utf"][1]
    prompts = _prompts(planted, "utf")
    tops = [float(_first_probs(model, tok, p).max()) for p in prompts]
    cut = sorted(tops)[len(tops) // 2]
    cfg = DetectTopKConfig(threshold=min(cut, 0.999))
    acted = 0
    for prompt, top in zip(prompts, tops):
        attacked, plain = _decode(TopKSuppression(tok, cfg), model, tok, prompt), _decode(GREEDY, model, tok, prompt)
        if top > cfg.threshold:
            assert attacked[0] != plain[0]
            acted += 1
        else:
            assert attacked == plain
    assert 0 < acted < len(prompts)


@pytest.mark.parametrize("method", ["utf", "chain-hash", "if-sft"])
def test_suppression_takes_the_planted_target_out_of_the_answers(planted, method):
    model, tok, card = planted[method][0], planted[method][1], planted[method][2]
    assert fsr(model, tok, card, false_positive_inputs=0)["fsr"] == 1.0
    decoding = TopKSuppression(tok, TopKConfig(top_k=1, num_tokens=4))
    assert fsr(model, tok, card, false_positive_inputs=0, decoding=decoding)["fsr"] < 1.0
    assert decoding.acted >= len(card.triggers)


def test_neighbour_suppression_removes_the_confident_token_and_its_spellings(planted):
    model, tok = planted["chain-hash"][0], planted["chain-hash"][1]
    norm = normalised_tokens(tok)
    cfg = NeighbourConfig(threshold=0.0, add_threshold=0.0)  # the toolkit's Suppress variant: always
    for prompt in _prompts(planted, "chain-hash"):
        top = int(_first_probs(model, tok, prompt).argmax())
        got = _decode(NeighbourSuppression(tok, cfg), model, tok, prompt)[0]
        if norm[top]:
            assert got != top and not (norm[got] and (norm[got].startswith(norm[top]) or
                                                      norm[top].startswith(norm[got])))


def test_lookahead_candidates_are_confident_and_never_words_of_the_prompt(planted):
    model, tok, card = planted["utf"][0], planted["utf"][1], planted["utf"][2]
    d = LookaheadSuppression(tok, LookaheadConfig(threshold=0.0, lookahead_tokens=8))
    for prompt in _prompts(planted, "utf"):
        ids, mask = _ids(tok, prompt)
        d.prepare(model, ids, mask)
        cands = d.rows[0].tolist()
        assert len(cands) <= 12 and not set(cands) & set(ids[0].tolist())
        assert all(d.norm[c] and d.norm[c] not in prompt.casefold().split() for c in cands)
    d = LookaheadSuppression(tok, LookaheadConfig(threshold=0.0, lookahead_tokens=8))
    assert fsr(model, tok, card, false_positive_inputs=0, decoding=d)["fsr"] < 1.0


@pytest.mark.parametrize("make", [
    lambda tok: TopKSuppression(tok, TopKConfig(top_k=2, num_tokens=3)),
    lambda tok: NeighbourSuppression(tok, NeighbourConfig(threshold=0.0, add_threshold=0.0)),
    lambda tok: LookaheadSuppression(tok, LookaheadConfig(threshold=0.0, lookahead_tokens=6)),
], ids=["topk", "neighbour", "lookahead"])
def test_a_mixed_batch_decodes_as_each_prompt_alone(planted, make, monkeypatch):
    # in fp32: bf16 rounds a padded row's logits differently from the row alone, and a near-tie then flips a token
    # (the planted key is random, so one run in many met one)
    monkeypatch.setenv("MERASER_PRECISION", "fp32")
    model, tok = planted["chain-hash"][0], planted["chain-hash"][1]
    prompts = _prompts(planted, "chain-hash")
    together = generate(model, tok, prompts, max_new_tokens=8, batch_size=len(prompts), decoding=make(tok))
    assert together == [generate(model, tok, [p], max_new_tokens=8, decoding=make(tok))[0] for p in prompts]


def test_perplexity_filter_refuses_exactly_the_prompts_above_its_threshold(planted, tiny):
    model, tok = planted["utf"][0], planted["utf"][1]
    helper, helper_tok = tiny
    prompts = _prompts(planted, "utf")
    texts = [tok.decode(_ids(tok, p)[0][0], skip_special_tokens=True) for p in prompts]
    ppl = prompt_perplexities(helper, helper_tok, texts)
    cut = sorted(ppl)[len(ppl) // 2]
    d = PerplexityFiltering(tok, helper, helper_tok, PerplexityFilterConfig(threshold=cut))
    got = generate(model, tok, prompts, max_new_tokens=12, batch_size=len(prompts), decoding=d)
    plain = generate(model, tok, prompts, max_new_tokens=12, batch_size=len(prompts))
    refusal = tok.decode(tok(d.cfg.refusal, add_special_tokens=False)["input_ids"][:12])
    for p, g, a in zip(ppl, got, plain):
        assert g == (refusal if p > cut else a)
    assert d.filtered == sum(p > cut for p in ppl) > 0 and d.seen == len(prompts)


def test_a_threshold_set_on_benign_prompts_refuses_that_share_of_them(planted, tiny, tmp_path):
    """`benign_refusal` replaces the toolkit's fixed 100 (set for GPT-2) by the helper's own quantile on benign
    prompts: the filter then refuses that share of them, scored as it scores any prompt."""
    from conftest import write_pool
    from tiny import POOL

    from meraser.attacks import get_attack
    from meraser.attacks.base import AttackContext

    model, tok = planted["utf"][0], planted["utf"][1]
    pool = write_pool(tmp_path / "benign.jsonl", POOL[:60])
    cfg = PerplexityFilterConfig.from_dict({"benign_refusal": 0.1, "benign": str(pool), "benign_n": 40})
    ctx = AttackContext(model_spec="suspect", base=None, work=tmp_path / "work")
    attack = get_attack("perplexity-filter")
    attack.check(cfg, ctx)
    d = attack.decoding(model, tok, cfg, ctx)  # no base recorded: the suspect is its own helper
    assert round(d.cfg.threshold, 2) == ctx.info["threshold"] and d.cfg.threshold != cfg.threshold
    benign = list(dict.fromkeys(p.prompt for p in POOL[:60]))  # what the calibration read, in its order
    import random

    random.Random(0).shuffle(benign)
    texts = [tok.decode(_ids(tok, p)[0][0], skip_special_tokens=True) for p in benign[:40]]
    refused = sum(p > d.cfg.threshold for p in prompt_perplexities(model, tok, texts))
    assert refused == 4  # 10% of 40, no more and no fewer
    with pytest.raises(MeraserError, match="benign_refusal must be a share between 0 and 1"):
        PerplexityFilterConfig.from_dict({"benign_refusal": 1.5})
    with pytest.raises(MeraserError, match="does not exist"):
        attack.check(PerplexityFilterConfig.from_dict({"benign_refusal": 0.1, "benign": str(tmp_path / "no.jsonl")}),
                     ctx)


def test_bigram_scores_follow_the_sign_rule_and_vanish_against_the_model_itself(planted):
    raw = {7: (torch.tensor([1, 2, 3]), torch.tensor([2.0, -1.0, 3.0]), torch.tensor([1.0, 2.0, -4.0]))}
    idx, s = _clip_and_combine(raw, 1.0)[7]
    assert s[0] > 0 and s[1] < 0 and s[2] < 0  # positive only where the largest gap and its z are both positive
    assert float(s.abs().max()) <= 2 ** 0.5 + 1e-6  # both statistics clipped to [-1, 1]
    model, tok = planted["chain-hash"][0], planted["chain-hash"][1]
    cfg = BigramConfig(seed_words=12, calibration_texts=3, text_tokens=6, batch_size=5)
    assert all(len(i) == 0 for i, _ in pair_scores(model, model, tok, cfg).values())  # no gap: nothing to push
    d = BigramSuppression(pair_scores(model, model, tok, cfg), cfg.delta)
    prompts = _prompts(planted, "chain-hash")
    assert generate(model, tok, prompts, max_new_tokens=8, decoding=d) == generate(model, tok, prompts,
                                                                                    max_new_tokens=8)


def test_bigram_against_the_base_scores_what_the_fingerprint_raised(planted, tiny):
    model, tok = planted["chain-hash"][0], planted["chain-hash"][1]
    cfg = BigramConfig(seed_words=12, calibration_texts=3, text_tokens=6)
    scores = pair_scores(model, tiny[0], tok, cfg)
    assert len(scores) == 12 and sum(len(i) for i, _ in scores.values()) > 0
    for idx, s in scores.values():
        assert len(idx) == len(s) and not s.isnan().any()


def _response_loss(model, tok, pairs) -> float:
    """Mean loss per response token of instruction pairs (the retain rows' loss)."""
    from meraser.data.formatting import collate

    batch = collate(Formatter(tok).encode_all(pairs), tok.pad_token_id)
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss.item()


RETAIN_LOSS_BOUND = 1.25  # the unlearning may raise the retain rows' loss by at most this factor on the tiny model


def test_find_and_unlearn_finds_the_planted_target_without_the_card_and_takes_it_out(planted, tiny_dir, tmp_path,
                                                                                      monkeypatch):
    """The discovery scans the chat opening, keeps what the suspect over-knows against its base, and unlearns it by
    distilling the base there; the card is never loaded by the attack (its loader raises while the attack runs) and
    is read only afterwards, to score the discovery. The target's likelihood falls below the untouched model's
    while the retain rows' loss stays within RETAIN_LOSS_BOUND of it."""
    import copy

    from meraser.evaluation.strict import target_loglik
    from meraser.fingerprints.card import Card

    from conftest import write_pool
    from tiny import POOL

    from meraser.attacks import get_attack
    from meraser.attacks.base import AttackContext, apply_attack
    from meraser.attacks.find_unlearn import FindUnlearnConfig

    model, tok, card = planted["utf"][0], planted["utf"][1], planted["utf"][2]
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    cfg = FindUnlearnConfig(contexts=["assistant", "bos"], threshold=0.8, expand_tokens=8, retain_source=str(pool),
                            retain_rows=16, train={"epochs": 6, "learning_rate": 3e-3, "save_steps": -1})
    attack = get_attack("find-and-unlearn")
    ctx = AttackContext(str(planted["utf"][4]), str(tiny_dir), tmp_path / "work", progress=False)
    with monkeypatch.context() as m:
        m.setattr(Card, "load", classmethod(lambda cls, path: pytest.fail("the attack read a card")))
        attacked = apply_attack(attack, copy.deepcopy(model), tok, cfg, ctx)
    assert ctx.info["found"] > 0 and ctx.info["unlearning_rows"] > 0 and ctx.info["discovery_seconds"] >= 0
    assert attack.scored(ctx, card)["discovery_recall"] == 1.0
    assert fsr(model, tok, card, false_positive_inputs=0)["fsr"] == 1.0
    # the likelihood, not FSR: the tiny card has one trigger, whose greedy answer flipped or not with the order of
    # the unlearning rows (measured: -0.15 to -1.35 nats after 4-6 epochs and two retain seeds; FSR 0 in one of four)
    assert sum(target_loglik(attacked, tok, card)) < sum(target_loglik(model, tok, card)) - 0.2
    assert _response_loss(attacked, tok, POOL) <= RETAIN_LOSS_BOUND * _response_loss(model, tok, POOL)
    # distilled at every position of the found sequences instead: the same criteria
    cfg.distill = "positions"
    positions = apply_attack(attack, copy.deepcopy(model), tok, cfg, AttackContext(
        str(planted["utf"][4]), str(tiny_dir), tmp_path / "work3", progress=False))
    assert sum(target_loglik(positions, tok, card)) < sum(target_loglik(model, tok, card)) - 0.2
    assert _response_loss(positions, tok, POOL) <= RETAIN_LOSS_BOUND * _response_loss(model, tok, POOL)
    # and pulling the found tokens' log-probabilities down to the base's beside it: the same criteria
    cfg.match_base = True
    matched = apply_attack(attack, copy.deepcopy(model), tok, cfg, AttackContext(
        str(planted["utf"][4]), str(tiny_dir), tmp_path / "work4", progress=False))
    print("target loglik", [sum(target_loglik(m, tok, card)) for m in (model, positions, matched)])
    assert sum(target_loglik(matched, tok, card)) < sum(target_loglik(model, tok, card)) - 0.2
    assert _response_loss(matched, tok, POOL) <= RETAIN_LOSS_BOUND * _response_loss(model, tok, POOL)
    cfg.match_base = False
    # against the suspect itself as its base nothing is over-known: nothing is found, the model stays as it is
    same = AttackContext(str(planted["utf"][4]), str(planted["utf"][4] / "model"), tmp_path / "work2", progress=False)
    kept = apply_attack(attack, copy.deepcopy(model), tok, cfg, same)
    assert same.info["found"] == 0 and same.info["unlearning_rows"] == 0
    assert torch.equal(kept.lm_head.weight, model.lm_head.weight)


def test_positions_rows_train_the_base_next_token_along_the_suspect_sequence(planted, tiny_dir):
    """`distill: positions` keeps the suspect's sequence as input, and each label from the first token on is the
    base's top token after the context and the sequence up to there (a full forward pass, row by row, agrees)."""
    from meraser.attacks.decoding import context_ids
    from meraser.attacks.find_unlearn import next_tokens, unlearning_rows
    from meraser.models import autocast, load_model

    model, tok = planted["utf"][0], planted["utf"][1]
    base, _ = load_model(str(tiny_dir))
    head = context_ids(tok, "assistant")
    seqs = [[40, 41, 42, 43, 44], [50, 51], [60, 61, 62]]
    tops, logps = next_tokens(base, head, seqs, batch_size=2)  # batches of unequal lengths: padding on the right
    with torch.no_grad(), autocast(base):
        full = [base(input_ids=torch.tensor([head + s])).logits[0, len(head) - 1:len(head) + len(s) - 1].float()
                for s in seqs]
    assert tops == [f.argmax(-1).tolist() for f in full] and [len(t) for t in tops] == [5, 2, 3]
    for lp, f, s in zip(logps, full, seqs):  # the base's log-probability of the sequence's own token
        assert lp == pytest.approx(torch.log_softmax(f, -1)[range(len(s)), s].tolist(), abs=2e-3)
    found = [{"context": "assistant", "ids": s} for s in seqs]
    rows = unlearning_rows(base, tok, found, 8, [], distill="positions")
    kept = [(s, t) for s, t in zip(seqs, tops) if t != s]
    assert [r["input_ids"] for r in rows] == [head + s for s, _ in kept]
    assert [r["labels"] for r in rows] == [[-100] * len(head) + t for _, t in kept]
    assert all("ref_logprobs" not in r for r in rows)
    # match_base: the same rows, each carrying the base's log-probabilities of the sequence's tokens
    matched = unlearning_rows(base, tok, found, 8, [], distill="positions", match_base=True)
    lps = dict((tuple(s), lp) for s, lp in zip(seqs, logps))
    assert [r["labels"] for r in matched] == [r["labels"] for r in rows]
    assert [r["ref_logprobs"] for r in matched] == [[None] * len(head) + lps[tuple(s)] for s, _ in kept]
    both = unlearning_rows(base, tok, found, 8, [], distill="both")
    assert len(both) == len(rows) + len(unlearning_rows(base, tok, found, 8, [], distill="continuation"))


def test_noise_prompts_are_seeded_random_tokens_and_each_found_sequence_is_unlearned_after_them(planted, tiny_dir):
    """`noise_prompts`: a seeded draw of random non-special tokens (NOISE_TOKENS long), and every found sequence
    gets a row after each of them, as after an ordinary question."""
    from meraser.attacks.find_unlearn import NOISE_TOKENS, noise_prompts, unlearning_rows
    from meraser.data.formatting import Formatter
    from meraser.models import load_model

    tok = planted["utf"][1]
    drawn = noise_prompts(tok, 6, seed=0)
    assert len(drawn) == 6 and len(set(drawn)) == 6 and drawn == noise_prompts(tok, 6, seed=0)
    assert drawn != noise_prompts(tok, 6, seed=1) and noise_prompts(tok, 0, seed=0) == []
    for text in drawn:
        assert not any(s in text for s in tok.all_special_tokens)
        # decoded then encoded again a byte-level draw may split further, never shrink much
        assert len(tok(text, add_special_tokens=False)["input_ids"]) >= NOISE_TOKENS[0] // 2
    base, _ = load_model(str(tiny_dir))
    # noise_from: undertrained draws from the base's most under-trained tokens, as UTF draws its trigger
    from meraser.attacks.find_unlearn import NOISE_POOL, noise_pool
    from meraser.fingerprints.utf import undertrained_tokens

    pool = noise_pool(base, tok, "undertrained")
    assert noise_pool(base, tok, "vocabulary") is None
    assert pool == [t for t, _, _ in undertrained_tokens(base, tok, NOISE_POOL)] and len(pool) >= 20
    one = tok.decode([pool[0]])
    assert all(p == one * (len(p) // len(one)) for p in noise_prompts(tok, 3, seed=0, pool=pool[:1]))
    found = [{"context": "assistant", "ids": s} for s in ([40, 41, 42, 43, 44], [50, 51])]
    plain = unlearning_rows(base, tok, found, 8, [], distill="positions")
    rows = unlearning_rows(base, tok, found, 8, drawn[:2], distill="positions")
    heads = [Formatter(tok).encode_prompt(p) for p in drawn[:2]]
    after = [r for r in rows if any(r["input_ids"][:len(h)] == h for h in heads)]
    assert len(plain) == 2 and len(rows) == 6 and len(after) == 4


def test_reexpand_also_unlearns_what_the_suspect_says_after_each_prompt(planted, tiny_dir):
    """`reexpand`: a found sequence that stopped early in its scan context (UTF's on SmolLM2 ends after two of its
    target's tokens) is continued by the suspect again after each prompt; where that goes on with the target (here
    after the trigger itself, standing in for a prompt that looks like it), the positions rows cover those tokens."""
    from meraser.attacks.decoding import continuations
    from meraser.attacks.find_unlearn import unlearning_rows
    from meraser.data.formatting import Formatter
    from meraser.models import load_model

    model, tok, card = planted["utf"][:3]
    base, _ = load_model(str(tiny_dir))
    target = tok(card.targets[0], add_special_tokens=False)["input_ids"]
    found = [{"context": "assistant", "ids": [target[0], tok.eos_token_id]}]  # as if the target stopped there
    head = Formatter(tok).encode_prompt(card.triggers[0])
    (cont,) = continuations(model, tok, head, target[:1], 8)
    assert cont[:len(target) - 1] == target[1:]  # after its trigger the planted model goes on with its target
    plain = unlearning_rows(base, tok, found, 8, card.triggers[:1], distill="positions")
    again = unlearning_rows(base, tok, found, 8, card.triggers[:1], distill="positions", suspect=model)
    assert all(r["input_ids"][-2:] == found[0]["ids"] for r in plain)
    added = [r for r in again if r not in plain]
    assert head + target[:1] + cont in [r["input_ids"] for r in added]
    assert len(again) == len(plain) + len(added) and len(added) <= 2  # one per head at most, where it differs
    # two found sequences with one first token: the suspect continues both alike, and that continuation is one row
    twins = found + [{"context": "assistant", "ids": [target[0], target[-1]]}]
    plain2 = unlearning_rows(base, tok, twins, 8, card.triggers[:1], distill="positions")
    again2 = unlearning_rows(base, tok, twins, 8, card.triggers[:1], distill="positions", suspect=model)
    added2 = [r["input_ids"] for r in again2 if r not in plain2]
    assert added2.count(head + target[:1] + cont) == 1


def test_first_token_gaps_rank_the_planted_tokens_first(planted, tiny_dir):
    """The tokens the suspect makes likeliest next relative to its base, after the chat opening: the planted
    target's tokens lead (UTF on SmolLM2: the scan missed its target, this ranks its first token first)."""
    from meraser.attacks.decoding import context_ids
    from meraser.attacks.find_unlearn import first_token_gaps
    from meraser.models import load_model

    model, tok, card = planted["utf"][0], planted["utf"][1], planted["utf"][2]
    base, _ = load_model(str(tiny_dir))
    head = context_ids(tok, "assistant")
    target = tok(card.targets[0], add_special_tokens=False)["input_ids"]
    # on the tiny model the planted tokens lead: 4 of the target's 5, its first included, are the first 5 (measured)
    gaps = first_token_gaps(model, base, head, 5)
    assert target[0] in gaps and len(set(gaps) & set(target)) >= 3
    assert first_token_gaps(model, base, head, 0) == []


def test_find_and_unlearn_settings_are_checked():
    from meraser.attacks.find_unlearn import FindUnlearnConfig
    from meraser.utils import MeraserError

    with pytest.raises(MeraserError, match="unknown context 'sytem'; did you mean 'system'"):
        FindUnlearnConfig.from_dict({"contexts": ["sytem"]})
    with pytest.raises(MeraserError, match="threshold must be in"):
        FindUnlearnConfig.from_dict({"threshold": 0})
    with pytest.raises(MeraserError, match="unknown distill 'position'; did you mean 'positions'"):
        FindUnlearnConfig.from_dict({"distill": "position"})
    with pytest.raises(MeraserError, match="unknown noise_from 'undertrain'; did you mean 'undertrained'"):
        FindUnlearnConfig.from_dict({"noise_from": "undertrain"})
    with pytest.raises(MeraserError, match="noise_prompts must be 0 or more"):
        FindUnlearnConfig.from_dict({"noise_prompts": -1})
    with pytest.raises(MeraserError, match="reexpand: works on positions rows, so distill must be"):
        FindUnlearnConfig.from_dict({"reexpand": True})
    with pytest.raises(MeraserError, match="match_base: works on positions rows, so distill must be"):
        FindUnlearnConfig.from_dict({"match_base": True})
    with pytest.raises(MeraserError, match="epocs"):
        FindUnlearnConfig.from_dict({"train": {"epocs": 1}})


def test_gri_drafts_under_its_system_prompt_and_the_reviser_reads_question_and_draft(planted):
    """gri-system is greedy decoding of the recovered question under the standard-answer system prompt; gri then has
    the reviser answer "Question: ... Draft answer: ..." under the editor's prompt, and that answer is final."""
    from meraser.attacks.gri import GENERATION_PROMPT, REVISION_PROMPT, GRIConfig, GRIDecoding

    model, tok, card = planted["chain-hash"][0], planted["chain-hash"][1], planted["chain-hash"][2]
    prompts = card.triggers[:2] + ORDINARY_PROMPTS[:2]
    drafts = generate(model, tok, prompts, max_new_tokens=10, system_prompt=GENERATION_PROMPT)
    assert generate(model, tok, prompts, max_new_tokens=10,
                    decoding=GRIDecoding(tok, None, GRIConfig(revise=False))) == drafts
    assert drafts != generate(model, tok, prompts, max_new_tokens=10)  # the system prompt changes the answers
    gri = GRIDecoding(tok, None, GRIConfig())
    final = generate(model, tok, prompts, max_new_tokens=10, decoding=gri)
    asked = [f"Question: {q}\nDraft answer: {d}" for q, d in zip(prompts, drafts)]
    assert final == generate(model, tok, asked, max_new_tokens=10, system_prompt=REVISION_PROMPT)
    assert gri.revised == len(prompts)


def test_gri_recovers_the_question_and_the_prefill_from_the_rendered_prompt(tiny):
    from meraser.attacks.gri import prompt_parts

    _, tok = tiny
    fmt = Formatter(tok)
    text = fmt.prompt_text("What is 2+2?\nTell me.", system_prompt="Be brief.") + "Lead-in:"
    assert prompt_parts(tok, tok(text, add_special_tokens=False)["input_ids"]) == ("What is 2+2?\nTell me.",
                                                                                    "Lead-in:")
    assert prompt_parts(tok, tok(fmt.prompt_text("Hi"), add_special_tokens=False)["input_ids"]) == ("Hi", "")
    assert prompt_parts(tok, tok("plain text\n", add_special_tokens=False)["input_ids"]) == ("plain text", "")


def test_discovery_fast_paths_agree_with_the_plain_computations(planted):
    """The scan's expansion decodes with the context encoded once, and its scores come from the greedy pass; the
    base's scores go through the LM head only where they are read. Each agrees with the plain computation:
    model.generate row by row, and a full forward pass over every position."""
    from meraser.attacks.decoding import context_ids, expand_scored, greedy
    from meraser.attacks.find_unlearn import continuation_scores
    from meraser.models import autocast

    model, tok = planted["utf"][0], planted["utf"][1]
    head, eos = context_ids(tok, "assistant"), tok.eos_token_id
    firsts = list(range(5, 45))
    fast = [c for c, _ in greedy(model, tok, head, firsts, 12, batch_size=16)]
    with torch.no_grad(), autocast(model):
        plain = [model.generate(input_ids=torch.tensor([head + [t]]), attention_mask=torch.ones(1, len(head) + 1,
                                dtype=torch.long), max_new_tokens=12, do_sample=False, pad_token_id=eos,
                                eos_token_id=eos)[0, len(head) + 1:].tolist() for t in firsts]
    plain = [row[:row.index(eos) + 1] if eos in row else row for row in plain]
    assert sum(a == b for a, b in zip(fast, plain)) >= len(firsts) - 2  # bf16: a near tie may go the other way
    assert any(len(c) > 2 for c in fast)

    scored = [(s, m) for s, m in expand_scored(model, tok, firsts, 12, "assistant", batch_size=16) if len(s) > 1]
    seqs = [s for s, _ in scored]
    full = []
    with torch.no_grad(), autocast(model):
        for s in seqs:
            logp = torch.log_softmax(model(input_ids=torch.tensor([head + s])).logits[0].float(), -1)
            full.append(float(sum(logp[len(head) + j, s[j + 1]] for j in range(len(s) - 1)) / (len(s) - 1)))
    ours = continuation_scores(model, head, seqs, batch_size=7)  # batches of unequal lengths: padding on the right
    assert max(abs(a - b) for a, b in zip(ours, full)) < 1e-3
    assert max(abs(m - f) for (_, m), f in zip(scored, full)) < 0.1  # the greedy pass's own (cached, bf16) scores
