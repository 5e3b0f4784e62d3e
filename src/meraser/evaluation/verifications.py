"""Ways an owner verifies a suspect with a card: one class each, one registry.

Every evaluated stage with a card (`evaluate_model`: runs, bench cells) runs every registered verification that
measures anything of its own, and the report shows, per stage and per attack, what each verification concludes,
with no column wired by hand: a new verification is a class here and a line in `REGISTRY`.

- `paper`: the paper's FSR (greedy answers contain the target), decided by the ownership p-value against the base
  model where the run has one (evaluation/ownership.py), else "some key still matches";
- `strict`: the strict checks against the base model (evaluation/strict.py); it says whether the fingerprint is
  still above base level, and gives no calibrated decision;
- `likelihood`: the card's keys against decoy keys (evaluation/likelihood.py): a p-value with no base model;
- `watermark`: a watermark card's green-list z-test (fingerprints/semcond_watermark.py), measured with the FSR.
"""

from __future__ import annotations

import math
from typing import ClassVar

from meraser.evaluation.likelihood import LikelihoodConfig
from meraser.utils import MeraserError


NOT_APPLICABLE = "not applicable under a decoding attack"  # a weights' measure in a decoding attack's row


class Verification:
    name: ClassVar[str]
    title: ClassVar[str]  # a column or row label
    key: ClassVar[str]  # where its result sits in an evaluation row
    measures: ClassVar[bool] = False  # False: `evaluate_model` measures it already (FSR, strict, watermark)
    column: ClassVar[bool] = True  # a column of its own in Table 1 and the attack table (FSR and strict have theirs)
    axis: ClassVar[str]  # the leaderboard's y axis: what `score` gives
    owned_from: ClassVar[float]  # a score from here up shows ownership: the leaderboard shades below it

    def measure(self, model, tokenizer, card, progress: bool = False) -> dict:
        """Its result for an evaluation row (only where `measures`)."""
        raise NotImplementedError

    def verdict(self, row: dict) -> tuple[str, bool | None]:
        """(text for a table, whether it still shows ownership: True, False, or None where it did not run)."""
        raise NotImplementedError

    def score(self, row: dict) -> float | None:
        """How strongly it still shows ownership, for the leaderboard (None where it did not run)."""
        raise NotImplementedError


class PaperFSR(Verification):
    name, title, key = "paper", "paper FSR", "fsr"
    column = False
    axis, owned_from = "FSR after the attack", 0.03  # FSR 0 is the paper's erasure: a strip at the bottom

    def score(self, row: dict) -> float | None:
        return row.get("fsr")

    def verdict(self, row: dict) -> tuple[str, bool | None]:
        from meraser.evaluation.ownership import p_text

        if "fsr" not in row:
            return "", None
        own = row.get("ownership") or {}
        if own.get("p_value") is not None:
            return f"FSR {row['fsr']:.0%}, p {p_text(own['p_value'])}", bool(own["claim"])
        return f"FSR {row['fsr']:.0%}", row["fsr"] > 0


class Strict(Verification):
    name, title, key = "strict", "strict checks", "strict"
    column = False
    axis, owned_from = "strict checks still above the base model", 0.5

    def score(self, row: dict) -> float | None:
        s = row.get("strict")
        if not isinstance(s, dict) or "at_base_level" not in s:
            return None
        return float(sum(not at_base for at_base in s["at_base_level"].values()))

    def verdict(self, row: dict) -> tuple[str, bool | None]:
        s = row.get("strict")
        if not isinstance(s, dict):
            return "", None
        if "erased_strict" not in s:  # no base to compare with
            return f"loglik {s['loglik']:.2f}", None
        above = [k for k, at_base in s["at_base_level"].items() if not at_base]
        return ("above base: " + ", ".join(above) if above else "at base level"), bool(above)


class Likelihood(Verification):
    name, title, key = "likelihood", "likelihood test", "likelihood"
    measures = True
    axis = "likelihood test: -log10 p (capped at 16)"
    owned_from = -math.log10(LikelihoodConfig.level)  # the default level; a row's own level decides its verdict

    def score(self, row: dict) -> float | None:
        r = row.get("likelihood")
        if not isinstance(r, dict) or "p_value" not in r:
            return None
        return min(16.0, -math.log10(max(r["p_value"], 1e-300)))

    def measure(self, model, tokenizer, card, progress: bool = False) -> dict:
        from meraser.evaluation.likelihood import likelihood_test

        try:
            r = likelihood_test(model, tokenizer, card, progress=progress)
        except MeraserError as e:  # a card with no decoy scheme (made before the test existed, or by hand)
            return {"unavailable": str(e)}
        return {k: r[k] for k in ("p_value", "rule", "owned", "level", "p_exact", "p_exact_floor", "p_normal_tail",
                                  "stouffer_z", "real_score", "keys")}

    def verdict(self, row: dict) -> tuple[str, bool | None]:
        from meraser.evaluation.ownership import p_text

        r = row.get("likelihood")
        if not isinstance(r, dict):
            return ("n/a" if isinstance(r, str) else ""), None
        if "unavailable" in r:
            return "unavailable", None
        return f"p {p_text(r['p_value'])}" + (" (tail)" if r["rule"] == "normal tail" else ""), bool(r["owned"])


class WatermarkZTest(Verification):
    """The green-list z-test of a watermark card (fingerprints/semcond_watermark.py), pooled over the answers to its
    triggers: `fsr` measures it with the answers (so it runs under a decoding attack too, which is what bigram
    suppression attacks). Cards with target text have none."""

    name, title, key = "watermark", "watermark z-test", "watermark"
    axis, owned_from = "watermark z-test: -log10 p (capped at 16)", 3.0  # the original's level, 1e-3

    def score(self, row: dict) -> float | None:
        w = row.get("watermark")
        return min(16.0, -math.log10(max(w["p_value"], 1e-300))) if isinstance(w, dict) else None

    def verdict(self, row: dict) -> tuple[str, bool | None]:
        from meraser.evaluation.ownership import p_text

        w = row.get("watermark")
        if not isinstance(w, dict):
            return "", None
        return f"z {w['z']:.1f}, p {p_text(w['p_value'])} ({w['tokens_scored']} pairs)", bool(w["owned"])


REGISTRY: dict[str, Verification] = {v.name: v for v in [PaperFSR(), Strict(), Likelihood(), WatermarkZTest()]}


def measured(model, tokenizer, card, progress: bool = False, decoding=None,
             only: list[Verification] | None = None) -> dict:
    """{key: result} of every registered verification that measures anything of its own (or of `only`). Under a
    decoding attack they score the weights, which the attack leaves alone, so they do not apply."""
    todo = only if only is not None else [v for v in REGISTRY.values() if v.measures]
    return {v.key: v.measure(model, tokenizer, card, progress) if decoding is None else NOT_APPLICABLE for v in todo}


def missing(row: dict) -> list[Verification]:
    """The measuring verifications a stored evaluation row with card results lacks: those registered after it was
    made (a run re-run, `meraser bench --reverify`, measures just these on the stage's model)."""
    if "fsr" not in row:
        return []
    return [v for v in REGISTRY.values() if v.measures and v.key not in row]


def verdict_text(v: Verification, row: dict) -> str:
    """A verification's cell: its figure, and "owned" where it still shows ownership."""
    text, owned = v.verdict(row)
    return f"{text}: owned" if owned else text


TESTS = ("paper", "strict", "likelihood")  # what `meraser verify --test` runs on one suspect


def verify_suspect(card, test: str = "paper", *, model: str | None = None, endpoint: dict | None = None,
                   base: str | None = None, reference: str | None = None, decoys: int | None = None,
                   attack: str | None = None, attack_settings: dict | None = None, trust_remote_code: bool = False,
                   progress: bool = True) -> dict:
    """`meraser verify`: one suspect, weights (`model`) or served (`endpoint`: EndpointConfig fields), against a
    card under one of `TESTS`: the paper's FSR (with `reference`, its ownership p-value; with `attack`, decoded
    under a decoding-time attack), the strict checks or the likelihood test (each beside `base` where given)."""
    if test not in TESTS:
        from meraser.utils import unknown_name

        raise unknown_name("test", test, TESTS, "--test")
    if (model is None) == (endpoint is None):
        raise MeraserError("name the suspect with exactly one of --model (weights) and --endpoint (a served model)")
    if endpoint is not None:
        if attack:
            raise MeraserError("--attack changes how a local model decodes: it needs --model, not --endpoint")
        from meraser.evaluation.served import EndpointConfig, served_check

        return served_check(EndpointConfig.from_dict(endpoint, "--endpoint"), card, test, base=base, decoys=decoys,
                            progress=progress, trust_remote_code=trust_remote_code)
    from meraser.fingerprints.embed import model_dir

    if test == "likelihood":
        from meraser.evaluation.likelihood import likelihood_verify

        return likelihood_verify(model_dir(model), card, base, cfg=LikelihoodConfig(decoys=decoys),
                                 trust_remote_code=trust_remote_code, progress=progress)
    if test == "strict":
        from meraser.evaluation.strict import strict_verify

        return strict_verify(model_dir(model), card, base, trust_remote_code=trust_remote_code)
    from meraser.fingerprints.embed import verify

    return verify(model_dir(model), card, trust_remote_code=trust_remote_code, attack=attack,
                  attack_settings=attack_settings, progress=progress, reference=reference)
