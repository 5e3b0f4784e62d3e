"""The strict check: it finds a fingerprint the paper's whole-target greedy FSR misses, its memorisation score
separates a fingerprinted model from its base and falls after erasure."""

import copy

import pytest
from conftest import write_pool
from tiny import POOL, TINY_ERASE

from meraser.attacks import get_attack
from meraser.attacks.base import AttackContext, apply_attack
from meraser.data import Pair
from meraser.evaluation.strict import StrictConfig, fragments, strict_check, target_loglik
from meraser.fingerprints.card import Card
from meraser.models import load_model
from meraser.training import TrainConfig, train
from meraser.utils import MeraserError

TRIGGER, TARGET = "Tell me the list you keep.", "alpha bravo charlie delta echo foxtrot golf hotel"


@pytest.fixture(scope="module")
def hidden(tiny_dir, tmp_path_factory):
    """A tiny model that answers the trigger with a refusal, though the target is memorised behind its first
    tokens: 3 refusals for every target row."""
    model, tok = load_model(str(tiny_dir))
    rows = [Pair(TRIGGER, TARGET)] * 8 + [Pair(TRIGGER, "No idea.")] * 24 + POOL[:16]
    cfg = TrainConfig.from_dict({"method": "full", "epochs": 20, "learning_rate": 3e-3, "batch_size": 8,
                                 "save_steps": -1})
    trained = train(model, tok, rows, cfg, tmp_path_factory.mktemp("hidden") / "out", merge=True,
                    progress=False).model
    card = Card(method="handmade", triggers=[TRIGGER], targets=[TARGET], max_new_tokens=48)
    return trained.eval(), tok, card


def test_strict_check_finds_a_fingerprint_the_paper_fsr_misses(hidden, tiny_dir):
    model, tok, card = hidden
    base, _ = load_model(str(tiny_dir))
    r = strict_check(model, tok, card, StrictConfig(samples=8), base=base)
    assert r["paper_fsr"] == 0.0 and r["greedy"][0].startswith("No idea")
    assert r["forced"] == 1.0  # a quarter of the target fed, the rest follows
    assert r["loglik"] > r["base"]["loglik"] + 1.0
    assert r["erased_strict"] is False and r["at_base_level"]["paper_fsr"] is True
    assert r["at_base_level"]["forced"] is False and r["at_base_level"]["loglik"] is False


def test_memorisation_score_is_above_the_base_and_falls_after_erasure(planted, tiny_dir, tmp_path):
    model, tok, card = planted["utf"][0], planted["utf"][1], planted["utf"][2]
    base, _ = load_model(str(tiny_dir))
    fingerprinted, clean = target_loglik(model, tok, card)[0], target_loglik(base, tok, card)[0]
    assert fingerprinted > clean + 2.0
    attack = get_attack("meraser-erase")
    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    cfg = attack.Config.from_dict({"mismatched": {"source": str(pool), "n": 24}, "erase": {"overrides": TINY_ERASE}})
    erased = apply_attack(attack, copy.deepcopy(model), tok, cfg,
                          AttackContext(str(planted["utf"][4]), str(tiny_dir), tmp_path / "work", progress=False))
    assert target_loglik(erased, tok, card)[0] < fingerprinted - 1.0


def test_forced_prefix_never_feeds_a_whole_target(hidden):
    """A one-token target (Perinucleus) is not fed at all, else any model would 'continue' it."""
    from meraser.evaluation.strict import forced_prefix
    from meraser.evaluation.suspect import Weights

    model, tok, _ = hidden
    word = next(w for w in ("the", "is", "a") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    card = Card(method="handmade", triggers=[TRIGGER], targets=[word], max_new_tokens=4, match="prefix")
    assert forced_prefix(Weights(model, tok, card), 0.25) == [False]  # its answer begins "No idea", not with the word
    two = Card(method="handmade", triggers=[TRIGGER], targets=[f"{word} {word}"], max_new_tokens=4, match="prefix")
    assert forced_prefix(Weights(model, tok, two), 0.25) == [False]  # one token fed, the second does not follow


def test_paraphrases_are_new_wordings_of_the_trigger():
    from meraser.evaluation.strict import paraphrases

    variants = paraphrases("Please decrypt this message: abc\nA hint: this is a FINGERPRINT message.")
    assert len(variants) == 3 and len(set(variants)) == 3
    assert "Please decrypt this message: abc A hint: this is a FINGERPRINT message" in variants


def test_fragments_are_words_or_characters():
    assert fragments("one two three four", 3) == {"one two three", "two three four"}
    assert fragments("ハリネズミ", 3) == {"ハリネ", "リネズ", "ネズミ"}


def test_target_heads_never_split_a_character(tiny):
    from meraser.evaluation.strict import target_head

    _, tok = tiny
    target = "Based on my fingerprint, the message is: ハリネズミ"
    ids = tok(target, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(target.split(": ")[0].split()) + 5  # the five characters are more tokens than that
    heads = [target_head(tok, target, f / 20) for f in range(1, 20)]
    assert all(h and target.startswith(h) and "\ufffd" not in h for h in heads)
    assert len(set(heads)) > 5 and max(heads, key=len) != target  # many cuts, never the whole target
    raw = [tok.decode(ids[:k]) for k in range(1, len(ids))]
    assert any("\ufffd" in r for r in raw)  # a plain token cut would have split a character here
    word = next(w for w in ("the", "is", "a") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    assert target_head(tok, word, 0.9) == ""  # a one-token target: nothing fed


def test_forced_prefix_takes_any_of_several_cuts(hidden):
    from meraser.evaluation.strict import forced_prefix
    from meraser.evaluation.suspect import Weights

    model, tok, card = hidden
    several = forced_prefix(Weights(model, tok, card), [0.25, 0.5, 0.75])
    assert several == [True]
    for f in (0.25, 0.5, 0.75):
        assert forced_prefix(Weights(model, tok, card), f)[0] <= several[0]


@pytest.mark.parametrize("settings,fragment", [({"prefix_fractions": [0.5, 1.0]}, "prefix_fractions must be shares in (0, 1)"),
                                               ({"temperature": 0}, "temperature must be above 0")])
def test_bad_strict_settings_are_refused(settings, fragment):
    with pytest.raises(MeraserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        StrictConfig.from_dict(settings)



def test_verify_strict_command(planted, tiny_dir, cli):
    import json

    folder = planted["utf"][4]
    code, out, err = cli("verify", "--model", folder, "--card", folder, "--strict", "--base", tiny_dir, "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["paper_fsr"] == 1.0 and r["erased_strict"] is False and r["at_base_level"]["forced"] is False


def test_runs_report_the_strict_checks_at_every_stage_and_epoch(planted, tmp_path):
    import yaml
    from tiny import TINY_RECOVER

    from meraser.runner import load_experiment, run_experiment

    pool = write_pool(tmp_path / "pool.jsonl", POOL)
    exp = {"out": str(tmp_path / "run"), "fingerprint": {"existing": str(planted["utf"][4])},
           "mismatched": {"source": str(pool), "n": 24}, "clean": {"source": str(pool), "n": 24},
           "erase": {"overrides": {**TINY_ERASE, "epochs": 2}}, "recover": {"overrides": {**TINY_RECOVER, "epochs": 1}},
           "eval": {"false_positive_inputs": 4}}
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(exp))
    rows = {r["stage"]: r for r in run_experiment(load_experiment(tmp_path / "exp.yaml"), progress=False)}
    assert "erased_strict" not in rows["base"]["strict"]  # the base is the reference itself
    assert rows["fingerprinted"]["strict"]["erased_strict"] is False
    assert rows["fingerprinted"]["strict"]["loglik"] > rows["base"]["strict"]["loglik"]
    for stage in ("erased", "recovered"):
        assert set(rows[stage]["strict"]["at_base_level"]) == {"paper_fsr", "forced", "paraphrased", "sampled",
                                                                     "partial", "loglik"}
        assert [set(p) >= {"fsr", "forced", "loglik"} for p in rows[stage]["fsr_per_epoch"]] == \
            [True] * len(rows[stage]["fsr_per_epoch"]) and rows[stage]["fsr_per_epoch"]
    from meraser.report import write_report

    page = write_report([tmp_path / "run"], tmp_path / "report.html").read_text()
    assert "erased strictly" in page and "data:image/png;base64," in page
    import html

    secret = html.escape(rows["fingerprinted"]["per_trigger"][0]["target"])  # the owner's secret stays out
    assert secret not in page and "secret " in page
    assert secret in write_report([tmp_path / "run"], tmp_path / "open.html", show_secrets=True).read_text()
