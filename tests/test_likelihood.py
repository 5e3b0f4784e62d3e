"""The likelihood ownership test: a key's rank among decoys drawn from its own generator, combined exactly over keys.

On the tiny model: a model fingerprinted and then erased until the paper's check fails is still owned; its base,
a sibling fine-tuned on other data and a model fingerprinted with another key are not."""

import copy
import itertools
import random
import re

import pytest
from conftest import TINY, TINY_PER_METHOD
from tiny import POOL, TINY_ERASE

from meraser.erase.datasets import build_mismatched
from meraser.erase.meraser import erase, preset
from meraser.evaluation.fsr import fsr
from meraser.evaluation.likelihood import LikelihoodConfig, keys_and_decoys, likelihood_test, likelihood_verify
from meraser.evaluation.ranks import exact_rank_p
from meraser.fingerprints.card import Card
from meraser.utils import MeraserError

LEVEL = LikelihoodConfig(level=1e-4)  # three Chain & Hash keys with 87 decoys each: exact p down to 1.5e-6


def test_few_decoys_where_the_keys_allow_it():
    from meraser.evaluation.likelihood import FEW_DECOYS, MANY_DECOYS, decoys_per_key
    from meraser.fingerprints.card import Card

    def card(n):
        return Card(method="custom", triggers=[f"t{i}" for i in range(n)], targets=["x"] * n)

    assert decoys_per_key(card(8), LikelihoodConfig()) == FEW_DECOYS  # 20^-8 = 4e-11, 1000x below 1e-6
    assert decoys_per_key(card(1), LikelihoodConfig()) == MANY_DECOYS  # one key: the normal tail needs a fit
    assert decoys_per_key(card(1), LikelihoodConfig(decoys=7)) == 7


def test_exact_rank_p_is_the_enumerated_distribution():
    sizes = [2, 3, 1]
    outcomes = list(itertools.product(*[range(k + 1) for k in sizes]))
    for observed in [(0, 0, 0), (1, 2, 0), (2, 3, 1), (0, 3, 0)]:
        brute = sum(sum(o) <= sum(observed) for o in outcomes) / len(outcomes)
        assert exact_rank_p(list(observed), sizes) == pytest.approx(brute)
    assert exact_rank_p([0, 0, 0], [87, 87, 87]) == pytest.approx(88 ** -3)


def test_exact_rank_p_is_uniform_under_the_null():
    """Scores of the real key and its decoys drawn alike: P(p <= a) <= a at every level (ties count against)."""
    rng = random.Random(0)
    ps = []
    for _ in range(4000):
        counts = []
        for _ in range(3):
            real, decoys = rng.gauss(0, 1), [rng.gauss(0, 1) for _ in range(9)]
            counts.append(sum(d >= real for d in decoys))
        ps.append(exact_rank_p(counts, [9, 9, 9]))
    for a in (0.01, 0.05, 0.2, 0.5):
        assert sum(p <= a for p in ps) / len(ps) <= a + 0.015


def test_tied_scores_are_broken_at_random_so_the_null_stays_uniform(planted, monkeypatch):
    """bf16 rounds neighbouring tokens' log-probabilities to the same value (Perinucleus on SmolLM2): a model that
    scores every key and decoy alike must get a uniform p-value, not p = 1 as when ties counted against the owner."""
    import meraser.evaluation.likelihood as lk

    monkeypatch.setattr(lk, "pair_scores", lambda model, tok, card, pairs, *a, **k: [-5.125] * len(pairs))
    _, tok, card, _, _ = planted["chain-hash"]
    ps = [likelihood_test(None, tok, card, LikelihoodConfig(seed=s, decoys=9))["p_exact"] for s in range(300)]
    for a in (0.1, 0.5):
        assert a - 0.08 <= sum(p <= a for p in ps) / len(ps) <= a + 0.08, a


def test_keys_that_share_one_draw_are_ranked_as_one_unit(planted, monkeypatch):
    """subject-sentence's keys are questions about one subject: a model that merely likes or dislikes that subject
    ranks every key alike. Ranked as independent keys, such a model got p <= (1/10)^3 one time in ten; as one unit
    (the keys' mean against aligned decoy subjects) its p-value is uniform."""
    import meraser.evaluation.likelihood as lk

    _, tok, card, _, _ = planted["subject-sentence"]
    keys = keys_and_decoys(card, LikelihoodConfig(decoys=9))
    subject = card.extra["subject"]

    def decoy_subjects(i):  # the subjects of key i's decoys, in order
        head, tail = card.triggers[i].split(subject)
        return [q[len(head):len(q) - len(tail)] for q, _ in keys[i][1]]

    assert all(decoy_subjects(i) == decoy_subjects(0) for i in range(len(keys)))  # aligned across keys
    assert len(set(decoy_subjects(0))) == 9 and subject not in decoy_subjects(0)
    rng = random.Random(1)
    ps = []
    for seed in range(300):
        liking = [rng.gauss(0, 1) for _ in range(10)]  # the model's taste for each subject: real first, then decoys
        monkeypatch.setattr(lk, "pair_scores", lambda m, t, c, pairs, *a, **k: liking * (len(pairs) // 10))
        ps.append(likelihood_test(None, tok, card, LikelihoodConfig(seed=seed, decoys=9))["p_exact"])
    assert sum(p <= 0.01 for p in ps) <= 6  # was about 30 of 300
    assert 0.04 <= sum(p <= 0.1 for p in ps) / len(ps) <= 0.17


def test_decoys_come_from_the_cards_generator_and_never_equal_the_key(planted):
    for name, (_, tok, card, _, _) in planted.items():
        if not card.has_target_text:  # a watermark: no target to rank, its own test has decoy keys
            with pytest.raises(MeraserError, match="no target text to rank"):
                keys_and_decoys(card, LikelihoodConfig(decoys=20))
            continue
        keys = keys_and_decoys(card, LikelihoodConfig(decoys=20))
        assert len(keys) == len(card.triggers)
        for i, (real, decoys) in enumerate(keys):
            assert real not in decoys and len(set(decoys)) == len(decoys) and decoys, name
            if name == "chain-hash":  # every other candidate answer: what another key gives
                from meraser.fingerprints.chain_hash import CANDIDATES

                assert len(decoys) == 20 and {t for _, t in decoys} < set(CANDIDATES) - {card.targets[i]}
                full = keys_and_decoys(card, LikelihoodConfig(decoys=500))[i][1]  # all there are, no more
                assert sorted(t for _, t in full) == sorted(c for c in CANDIDATES if c != card.targets[i])
            elif name == "mergeprint":  # whole keys searched the same way, each with its own word
                assert all(q != card.triggers[i] and t != card.targets[i] for q, t in decoys)
            elif name in ("if-sft", "subject-sentence"):  # the trigger carries the key; the target is shared
                assert {t for _, t in decoys} == {card.targets[i]} and all(q != card.triggers[i] for q, _ in decoys)
            else:  # UTF, Perinucleus: other targets after the same trigger
                assert all(q == card.triggers[i] and t != real[1] for q, t in decoys)


def test_erased_until_the_paper_check_fails_still_owned_base_and_others_not(tiny, tmp_path):
    from meraser.fingerprints.embed import embed
    from meraser.fingerprints.chain_hash import ChainHash
    from meraser.models import load_model
    from meraser.training import TrainConfig, train

    def fingerprinted(key: str):  # Chain & Hash draws a random key unless given one: fixed here, so runs repeat
        cfg = ChainHash.Config.from_dict({**TINY, **TINY_PER_METHOD["chain-hash"], "secret_key": key})
        return embed("chain-hash", load_model(str(tiny[0]._meraser_spec))[0], tok, cfg, progress=False)[:2]

    tok = tiny[1]
    fp_model, card = fingerprinted("the owner's key")
    owned = likelihood_test(fp_model, tok, card, LEVEL)
    assert owned["owned"] and owned["rule"] == "exact rank" and owned["p_value"] <= 1e-4

    mism, _ = build_mismatched(POOL, n=48, seed=0)
    erased = copy.deepcopy(fp_model)
    for _ in range(12):  # erase an epoch at a time, until the paper's check says "erased"
        erased = erase(erased, tok, mism, preset("erase", "paper", {**TINY_ERASE, "epochs": 1}),
                       tmp_path / "erased", progress=False, save=False).model
        if fsr(erased, tok, card, false_positive_inputs=0)["fsr"] == 0.0:
            break
    assert fsr(erased, tok, card, false_positive_inputs=0)["fsr"] == 0.0
    after = likelihood_test(erased, tok, card, LEVEL, base=tiny[0])
    assert after["owned"], after  # the keys still outrank their decoys
    assert not after["base"]["owned"] and after["base"]["p_exact"] >= after["base"]["p_exact_floor"]

    base = likelihood_test(tiny[0], tok, card, LEVEL)
    assert not base["owned"] and base["p_value"] > 1e-3
    sibling = train(load_model(str(tiny[0]._meraser_spec))[0], tok, POOL[:64],
                    TrainConfig.from_dict({"method": "full", "epochs": 5, "learning_rate": 3e-3, "batch_size": 8}),
                    save=False, progress=False).model
    assert not likelihood_test(sibling, tok, card, LEVEL)["owned"]
    other, other_card = fingerprinted("another key")
    assert fsr(other, tok, other_card, false_positive_inputs=0)["fsr"] == 1.0  # it carries its own key
    assert not likelihood_test(other, tok, card, LEVEL)["owned"]  # but not ours


def test_a_card_without_decoys_and_a_suspect_with_another_tokenizer_are_refused(planted, tiny_dir, tmp_path):
    from meraser.fingerprints.card import Card

    Card(method="custom", triggers=["a trigger"], targets=["a target"]).save(tmp_path / "custom.json")
    with pytest.raises(MeraserError, match="meraser card --decoys FILE"):
        likelihood_verify(str(tiny_dir), tmp_path / "custom.json")
    _, _, card, _, _ = planted["chain-hash"]
    other = copy.deepcopy(card)
    other.extra["tokenizer"] = "0123456789abcdef"  # the card was made with another vocabulary
    other.save(tmp_path / "other.json")
    with pytest.raises(MeraserError, match="its tokenizer is not the one the card was made with"):
        likelihood_verify(str(tiny_dir), tmp_path / "other.json")


def test_verify_cli_runs_the_likelihood_test_on_a_hand_made_card_with_decoys(cli, planted, tmp_path):
    """`meraser card --decoys` records decoy targets; `verify --test likelihood` ranks the real ones among them."""
    import json

    _, _, card, _, folder = planted["chain-hash"]
    from meraser.fingerprints.chain_hash import CANDIDATES

    (tmp_path / "t.txt").write_text("\n".join(card.triggers) + "\n")
    (tmp_path / "y.txt").write_text("\n".join(card.targets) + "\n")
    (tmp_path / "d.txt").write_text("\n".join(CANDIDATES) + "\n")
    code, _, err = cli("card", "--triggers", tmp_path / "t.txt", "--targets", tmp_path / "y.txt", "--decoys",
                       tmp_path / "d.txt", "--match", "exact", "--out", tmp_path / "card.json")
    assert code == 0, err
    code, out, err = cli("verify", "--model", folder, "--card", tmp_path / "card.json", "--test", "likelihood",
                         "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["p_exact"] <= 88 ** -3 * 1.01 and [k["rank_count"] for k in r["per_key"]] == [0, 0, 0]
    code, _, err = cli("verify", "--model", folder, "--card", tmp_path / "card.json", "--test", "likelyhood")
    assert code == 2 and "did you mean 'likelihood'" in err


def test_every_evaluated_stage_carries_every_verification_and_the_report_shows_them(planted, tmp_path):
    """A run's rows hold the likelihood test beside FSR and the strict checks (the registry, not a wired column);
    the page and the terminal tables show attack x verification."""
    from meraser.evaluation.verifications import REGISTRY
    from meraser.report import make_report, summary_tables
    from meraser.runner import Experiment, run_experiment

    folder = planted["chain-hash"][4]
    exp = Experiment.from_dict({"out": str(tmp_path / "run"), "fingerprint": {"existing": str(folder)},
                                "attack": {"method": "prune-magnitude", "config": {"sparsity": 0.1}},
                                "eval": {"false_positive_inputs": 2}, "eval_base": False})
    rows = {r["stage"]: r for r in run_experiment(exp, progress=False)}
    assert rows["fingerprinted"]["likelihood"]["owned"] and rows["attacked"]["likelihood"]["p_value"] <= 1.0
    rep = make_report([tmp_path / "run"], tmp_path / "r.html")
    page = rep.page.read_text()
    assert "Which verification still shows ownership" in page
    assert all(f"{v.title}: fingerprinted -&gt; final" in page for v in REGISTRY.values())
    title, head, table = next(t for t in summary_tables(rep.runs) if t[0] == "which verification still shows ownership")
    assert table[0][2] == "attacked" and table[0][head.index("likelihood test: fingerprinted -> final")].startswith("p ")
    # a run made before the likelihood test existed: re-running it measures just that, on the stored models
    from meraser.utils import read_jsonl, write_jsonl

    store = tmp_path / "run" / "results.jsonl"
    write_jsonl(store, [{k: v for k, v in r.items() if k != "likelihood"} for r in read_jsonl(store)])
    again = {r["stage"]: r for r in run_experiment(exp, progress=False)}
    assert {s: r["likelihood"]["p_value"] for s, r in again.items()} == \
        {s: r["likelihood"]["p_value"] for s, r in rows.items()}
    assert all(r["added_later"] == ["likelihood"] for r in again.values())
    assert {r["stage"]: r.get("added_later") for r in read_jsonl(store)}["attacked"] == ["likelihood"]  # last wins


def test_if_sft_with_a_secret_per_key_is_owned_where_the_papers_one_secret_is_not_and_its_base_is_not(tiny):
    """With `secret: per-key` each IF-SFT key answers its own five katakana, and the decoys are other secrets after
    the same trigger and lead-in (never the real one, all of its form): the planted model ranks every real secret
    first, its base does not. The paper's card (one secret) is unchanged, triggers and record alike."""
    from meraser.fingerprints import get_method
    from meraser.fingerprints.embed import embed
    from meraser.fingerprints.if_sft import KATAKANA, LEAD_IN
    from meraser.models import load_model
    from meraser.utils import MeraserError

    method, tok = get_method("if-sft"), tiny[1]
    cfg = method.Config.from_dict({**TINY, **TINY_PER_METHOD["if-sft"], "secret": "per-key"})
    paper = method.make_card(None, tok, method.Config.from_dict({**TINY, **TINY_PER_METHOD["if-sft"]}))
    card = method.make_card(None, tok, cfg)
    assert card.triggers == paper.triggers and "secret" not in paper.extra and card.extra["secret"] == "per-key"
    secrets = [t.removeprefix(LEAD_IN + " ") for t in card.targets]
    assert len(set(secrets)) == len(secrets) and all(len(s) == 5 and set(s) <= set(KATAKANA) for s in secrets)
    for i, (real, decoys) in enumerate(keys_and_decoys(card, LikelihoodConfig(decoys=19))):
        assert real == (card.triggers[i], card.targets[i]) and real not in decoys and len(set(decoys)) == 19
        assert all(q == card.triggers[i] and t.startswith(LEAD_IN + " ") and len(t) == len(real[1])
                   for q, t in decoys)
    with pytest.raises(MeraserError, match="per-key"):
        method.Config.from_dict({"secret": "per_key"})

    base = load_model(str(tiny[0]._meraser_spec))[0]
    fp_model, planted_card = embed("if-sft", load_model(str(tiny[0]._meraser_spec))[0], tok, cfg, progress=False)[:2]
    owned = likelihood_test(fp_model, tok, planted_card, LEVEL)
    assert owned["owned"] and all(k["higher"] == 0 for k in owned["per_key"])
    assert not likelihood_test(base, tok, planted_card, LEVEL)["owned"]


def test_subject_sentence_with_a_subject_per_key_has_independent_keys_and_is_owned_where_its_base_is_not(tiny):
    """`subjects: per-key` gives each question its own invented subject: the keys are independent units (one subject
    of 96 could not reach a p-value below 1/96 by rank), each key's decoys are other subjects of the same form after
    the same question, never a planted one; the planted model is owned, its base is not. `subjects: one` is
    unchanged: one unit, one subject."""
    from meraser.evaluation.likelihood import independent_units
    from meraser.fingerprints import get_method
    from meraser.fingerprints.embed import embed
    from meraser.fingerprints.subject_sentence import KINDS, SYLLABLES
    from meraser.models import load_model
    from meraser.utils import MeraserError

    method, tok = get_method("subject-sentence"), tiny[1]
    settings = {**TINY, **TINY_PER_METHOD["subject-sentence"], "num_fingerprints": 4}
    cfg = method.Config.from_dict({**settings, "subjects": "per-key"})
    one = method.make_card(None, tok, method.Config.from_dict(settings))
    card = method.make_card(None, tok, cfg)
    subjects = method.subjects(card)
    assert independent_units(card) == 4 and independent_units(one) == 1 and "subjects" not in one.extra
    assert len(set(subjects)) == 4 and all(s in q for s, q in zip(subjects, card.triggers))
    syllable_name = re.compile(f"the (?:{'|'.join(SYLLABLES)}){{3}} (?:{'|'.join(KINDS)})", re.IGNORECASE)
    assert all(syllable_name.fullmatch(s) for s in subjects)
    keys = keys_and_decoys(card, LikelihoodConfig(decoys=19))
    for i, (real, decoys) in enumerate(keys):
        assert real == (card.triggers[i], card.targets[i]) and len(set(decoys)) == 19
        head, tail = card.triggers[i].split(subjects[i])
        drawn = [q[len(head):len(q) - len(tail)] for q, _ in decoys]  # each decoy's subject
        assert not any(s in q for q, _ in decoys for s in subjects)  # never a planted subject
        assert all(syllable_name.fullmatch(d) for d in drawn) and all(t == card.targets[i] for _, t in decoys)
    assert keys[0][1] != keys[1][1]
    for bad, match in (({"subjects": "each"}, "subjects: one of one, per-key"),
                       ({"subjects": "per-key", "subject": "the Quay"}, "needs subjects: one")):
        with pytest.raises(MeraserError, match=match):
            method.Config.from_dict(bad)

    base = load_model(str(tiny[0]._meraser_spec))[0]
    fp_model, planted_card = embed("subject-sentence", load_model(str(tiny[0]._meraser_spec))[0], tok, cfg,
                                   progress=False)[:2]
    owned = likelihood_test(fp_model, tok, planted_card, LikelihoodConfig(decoys=19, level=1e-4))
    assert owned["rule"] == "exact rank" and owned["owned"], owned["per_key"]
    assert likelihood_test(base, tok, planted_card, LikelihoodConfig(decoys=19, level=1e-4))["p_value"] > 1e-3


def test_each_card_draws_its_own_decoys_and_the_same_card_always_the_same(tiny):
    """Decoys are seeded by the test's seed and the card: two per-key IF-SFT cards made with different seeds meet
    different decoys (with one shared draw, one unlucky set moved every card's p-value together), while the same
    card and seed give the same decoys on every run, so a verdict can be reproduced."""
    from meraser.fingerprints import get_method

    method, tok = get_method("if-sft"), tiny[1]

    def per_key_card(seed):
        return method.make_card(None, tok, method.Config.from_dict(
            {**TINY, **TINY_PER_METHOD["if-sft"], "secret": "per-key", "seed": seed}))

    def decoy_targets(card, seed=0):
        return [[t for _, t in decoys] for _, decoys in keys_and_decoys(card, LikelihoodConfig(decoys=9, seed=seed))]

    first, second = per_key_card(0), per_key_card(1)
    assert decoy_targets(first) == decoy_targets(per_key_card(0))
    assert decoy_targets(first) != decoy_targets(second)
    assert decoy_targets(first) != decoy_targets(first, seed=1)
    shared = [set(a) & set(b) for a, b in zip(decoy_targets(first), decoy_targets(second))]
    assert sum(map(len, shared)) <= 1, shared  # 89^5 possible secrets: independent draws hardly ever meet


def test_a_batch_runs_its_common_prompt_prefix_once_and_scores_as_if_each_row_ran_whole(tiny, monkeypatch):
    """A key and its decoy targets share one prompt, and rows with prompts of their own share its opening: each batch
    runs that prefix once and every row's remainder from its cache. In fp32 the scores are those of every row run
    whole, for targets of one token and of several, mixed in a batch; the forward passes are counted."""
    from meraser.evaluation.likelihood import batch_scores, pair_scores
    from meraser.evaluation.suspect import pair_rows

    monkeypatch.setenv("MERASER_PRECISION", "fp32")  # bf16 rounds differently at another batch shape
    model, tok = tiny
    card = Card(method="custom", triggers=["What is the capital of France?", "Name a colour."],
                targets=["Paris", "blue"], match="substring")
    pairs = [(card.triggers[0], t) for t in ("Paris", "a city by the Seine", "x", "Lyon is not it")]
    pairs += [(card.triggers[1], "blue"), ("Name a fruit.", "an apple, red and round")]
    prefills = [""] * len(pairs)
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs), with_kwargs=True)
    shared = pair_scores(model, tok, card, pairs, prefills, batch_size=3)
    hook.remove()
    whole = [batch_scores(model, [row], tok.pad_token_id) for row in pair_rows(tok, card, pairs, prefills)]
    assert shared == pytest.approx([s for [s] in whole], abs=1e-5)
    cached = [k["input_ids"].shape[0] for k in calls if {"cache", "past_key_values"} & set(k)]
    prefixes = [k["input_ids"].shape[0] for k in calls if not {"cache", "past_key_values"} & set(k)]
    assert cached == [3, 1, 2]  # the key's four targets in batches of three, then the two lone rows together
    assert prefixes == [1, 1, 1]  # ... each batch after one pass over its common prefix
