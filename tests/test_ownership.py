"""The ownership p-value: exact Poisson-binomial tail (checked against simulation), ~1 for an untouched model,
tiny for a fingerprinted one, and unavailable rather than guessed without a reference."""

import json
import random

import pytest

from meraser.evaluation.ownership import ownership, upper_tail


def test_upper_tail_agrees_with_a_direct_simulation():
    ps = [0.1, 0.5, 0.3, 0.05, 0.7, 0.2]
    rng = random.Random(0)
    trials = 200_000
    counts = [sum(rng.random() < p for p in ps) for _ in range(trials)]
    for k in range(len(ps) + 1):
        simulated = sum(c >= k for c in counts) / trials
        assert upper_tail(ps, k) == pytest.approx(simulated, abs=0.005)
    assert upper_tail(ps, 0) == 1.0 and upper_tail([0.5] * 3, 3) == pytest.approx(0.125)


def test_no_matches_give_p_one_and_many_unlikely_matches_a_claim():
    assert ownership([False] * 8, [-20.0] * 8)["p_value"] == 1.0
    r = ownership([True] * 8, [-20.0] * 8)
    assert r["p_value"] < 1e-60 and r["claim"] is True


def test_verify_reports_the_p_value_against_a_reference(planted, tiny_dir, cli):
    folder = planted["chain-hash"][4]
    code, out, err = cli("verify", "--model", folder, "--card", folder, "--reference", tiny_dir, "--json")
    assert code == 0, err
    own = json.loads(out)["ownership"]
    assert own["claim"] is True and own["p_value"] < 1e-6 and own["matches"] == own["keys"]
    code, out, err = cli("verify", "--model", tiny_dir, "--card", folder, "--reference", tiny_dir, "--json")
    assert code == 0, err
    assert json.loads(out)["ownership"]["p_value"] == pytest.approx(1.0) and json.loads(out)["fsr"] == 0.0
    code, out, err = cli("verify", "--model", folder, "--card", folder)
    assert code == 0 and "ownership p-value: unavailable" in out
