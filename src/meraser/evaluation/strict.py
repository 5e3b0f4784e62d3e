"""Strict verification beside the paper's FSR: is the fingerprint's association still in the weights?

The paper's FSR asks whether greedy decoding of a trigger contains the whole target. A model can fail that and
still hold the fingerprint (measured here: IF-SFT's secret comes back with its lead-in forced; a planted sentence's
closing phrase survives grafted onto a new opening). Five checks that do not depend on the model volunteering the
whole target for the exact trigger, each per trigger and averaged over the card:

- `forced`: the first quarter, half and three quarters of the target's tokens are fed in turn (after any prefill),
  and the rest must follow greedily after one of them: IF-SFT's secret comes back after its lead-in (half the
  target) though not after a quarter of it (measured). A cut never splits a character (a Japanese character is
  several byte tokens), and a one-token target is not fed at all: feeding it whole would pass trivially;
- `paraphrased`: the share of reworded triggers the model never saw (a lead-in or a closing request added, line
  breaks and final punctuation dropped) whose greedy answer contains the target. The rewordings follow from the
  trigger by rule, so every card gets them, cards of fingerprints made elsewhere included, and none needs storing;
- `sampled`: the share of temperature samples (4 at 0.7 by default) that contain the target;
- `loglik`: the mean log-probability per target token given the trigger, a memorisation score no decoding hides;
- `partial`: the share of the target's distinctive fragments (word n-grams, or character n-grams for text without
  spaces, that the base model's greedy answer to the same trigger does not contain) found in the greedy answer.

Given the base model, each check is also run on it, and the fingerprint counts as erased strictly only when every
check is back at the base model's level (`loglik` within `loglik_margin` nats per token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meraser.config import Config, field
from meraser.evaluation.suspect import Weights, answers, target_token_logprobs
from meraser.fingerprints.card import Card, matches
from meraser.utils import MeraserError


@dataclass
class StrictConfig(Config):
    prefix_fractions: list[float] = field([0.25, 0.5, 0.75], help="shares of the target's tokens fed, one at a "
                                                                  "time, before the rest must follow")
    samples: int = field(4, help="sampled answers per trigger")
    temperature: float = field(0.7, help="sampling temperature")
    ngram: int = field(3, help="fragment length: words, or characters for a target without spaces")
    loglik_margin: float = field(0.5, help="nats per token above the base model's log-likelihood still counted as "
                                           "base level")
    seed: int = field(0, help="sampling seed")

    def validate(self, where: str) -> None:
        if not self.prefix_fractions or not all(0 < f < 1 for f in self.prefix_fractions):
            raise MeraserError(f"{where}.prefix_fractions must be shares in (0, 1), got {self.prefix_fractions}")
        if self.samples < 1 or self.ngram < 1:
            raise MeraserError(f"{where}: samples and ngram must be at least 1")
        if self.temperature <= 0:
            raise MeraserError(f"{where}.temperature must be above 0, got {self.temperature}")


def fragments(text: str, n: int) -> set[str]:
    """Word n-grams of `text`, or character n-grams when it has no spaces (UTF's Japanese targets)."""
    words = text.split()
    if len(words) > 1:
        return {" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))}
    return {text[i:i + n] for i in range(max(1, len(text) - n + 1))}


def target_head(tokenizer, target: str, fraction: float) -> str:
    """The text of the first `fraction` of `target`'s tokens (at least one, never all of them), cut back to a
    token boundary that is also a character boundary: decoding half of a character's byte tokens gives U+FFFD,
    which re-encodes as other tokens and can never match (measured: a three-quarter cut of IF-SFT's Japanese
    secret failed even on the fingerprinted model). "" for a one-token target."""
    ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    k = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids))))
    while k > 0 and not target.startswith(tokenizer.decode(ids[:k])):
        k -= 1
    return tokenizer.decode(ids[:k]) if k > 0 else ""


def forced_prefix(suspect, fractions) -> list[bool] | None:
    """Feed each share in `fractions` (one share or several) of each target's leading tokens in turn; does the rest
    follow after any of them? A one-token target (Perinucleus) has no rest: nothing is fed, and the check is the
    greedy answer's. None where the suspect takes no prefill (a chat API)."""

    if not suspect.prefill:
        return None
    card, tok = suspect.card, suspect.tokenizer
    fractions = [fractions] if isinstance(fractions, (int, float)) else list(fractions)
    variants, longest = [], 0  # (trigger index, head), each distinct head once
    for i, target in enumerate(card.targets):
        longest = max(longest, len(tok(target, add_special_tokens=False)["input_ids"]))
        variants += [(i, h) for h in dict.fromkeys(target_head(tok, target, f) for f in fractions)]
    pre = card.trigger_prefills
    outs = answers(suspect, [card.triggers[i] for i, _ in variants], [pre[i] + h for i, h in variants],
                   max(card.max_new_tokens, longest + 4))
    found = [False] * len(card.targets)
    for (i, head), o in zip(variants, outs):
        found[i] = found[i] or matches(o[len(pre[i]):], card.targets[i], card.match)
    return found


CHECKS = ("paper_fsr", "forced", "paraphrased", "sampled", "partial", "loglik")
PARAPHRASES = ("Quick question. {t}", "{t}\nPlease answer.", "{flat}")


def paraphrases(trigger: str) -> list[str]:
    """Rule-made rewordings of a trigger (distinct from it and from each other)."""
    flat = " ".join(trigger.split()).rstrip(".?!")
    out = [p.format(t=trigger, flat=flat) for p in PARAPHRASES]
    return [p for p in dict.fromkeys(out) if p != trigger]


def paraphrased(suspect) -> list[float]:
    """Share of each trigger's rewordings whose greedy answer contains the target."""

    card = suspect.card
    variants = [(i, v) for i, t in enumerate(card.triggers) for v in paraphrases(t)]
    pre = card.trigger_prefills
    outs = answers(suspect, [v for _, v in variants], [pre[i] for i, _ in variants])
    hits = [[] for _ in card.triggers]
    for (i, _), o in zip(variants, outs):
        hits[i].append(matches(o, card.targets[i], card.match))
    return [sum(h) / len(h) if h else 0.0 for h in hits]


def sampled(suspect, samples: int, temperature: float, seed: int) -> list[float] | None:
    """Share of `samples` temperature samples per trigger that contain its target (None where the suspect does not
    sample)."""
    from meraser.generation import Sampling

    if not suspect.samples:
        return None
    card, n = suspect.card, len(suspect.card.triggers)
    outs = answers(suspect, card.triggers * samples, card.trigger_prefills * samples,
                   sampling=Sampling(temperature, seed))
    hits = [matches(o, card.targets[i % n], card.match) for i, o in enumerate(outs)]
    return [sum(hits[i::n]) / samples for i in range(n)]


def target_loglik(model, tokenizer, card: Card) -> list[float]:
    """Mean log-probability per target token after the trigger (and any prefill)."""
    return _means(target_token_logprobs(model, tokenizer, card))


def _means(logprobs: list[list[float]] | None) -> list[float] | None:
    return None if logprobs is None else [sum(lp) / len(lp) for lp in logprobs]


def partial(greedy: list[str], card: Card, n: int, base_greedy: list[str] | None = None) -> list[float]:
    """Share of each target's distinctive fragments found in the greedy answer."""
    scores = []
    for i, (out, target) in enumerate(zip(greedy, card.targets)):
        frags = fragments(target, n)
        if base_greedy is not None:
            frags = {f for f in frags if f not in base_greedy[i]} or frags
        scores.append(sum(f in out for f in frags) / len(frags))
    return scores


def _checks(suspect, cfg: StrictConfig, base_greedy: list[str] | None) -> dict:
    """Every check the suspect allows; a check it does not (forced prefix through a chat API, log-likelihood where
    no log-probabilities come back) is None, named in `not_run`."""
    from meraser.evaluation.fsr import fsr_of

    card = suspect.card
    paper = fsr_of(lambda p, f: answers(suspect, p, f), suspect.tokenizer, card, false_positive_inputs=0)
    greedy = [p["output"] for p in paper["per_trigger"]]
    forced = forced_prefix(suspect, cfg.prefix_fractions)
    per = {
        "forced": None if forced is None else [float(x) for x in forced],
        "paraphrased": paraphrased(suspect),
        "sampled": sampled(suspect, cfg.samples, cfg.temperature, cfg.seed),
        "loglik": _means(suspect.target_logprobs()),
        "partial": partial(greedy, card, cfg.ngram, base_greedy),
    }
    out = {"paper_fsr": paper["fsr"], **{k: None if v is None else sum(v) / len(v) for k, v in per.items()},
           "per_trigger": {k: v for k, v in per.items() if v is not None}, "greedy": greedy}
    return {**out, "not_run": [k for k, v in per.items() if v is None]} if None in per.values() else out


def strict_check(model, tokenizer, card: Card, cfg: StrictConfig | None = None, base=None,
                 base_result: dict | None = None, suspect=None) -> dict:
    """The checks on `model` (or on `suspect`, e.g. a served model, with `model` None). With the base model
    (`base`, same tokenizer) or its earlier result (`base_result`, e.g. the experiment's base row), also where each
    check stands against it, and the verdict over the checks that ran."""
    cfg = cfg or StrictConfig()
    if base is not None:
        base_result = strict_check(base, tokenizer, card, cfg)
    out = _checks(suspect or Weights(model, tokenizer, card), cfg, base_result["greedy"] if base_result else None)
    if base_result is None:
        return out
    ran = [k for k in CHECKS if out[k] is not None]
    at_base = {k: out[k] <= base_result[k] for k in ran if k != "loglik"}
    if "loglik" in ran:
        at_base["loglik"] = out["loglik"] <= base_result["loglik"] + cfg.loglik_margin
    return {**out, "base": {k: base_result[k] for k in CHECKS},
            "at_base_level": at_base, "erased_strict": all(at_base.values())}


def probe_settings() -> dict:
    """What the per-epoch probe's figures depend on. Probes are taken during training, so they belong to the erase
    and recover stages' identity: a stage made with another probe (or none) is not reused with its old curve."""
    return {"prefix_fractions": StrictConfig().prefix_fractions}


def probe(model, tokenizer, card: Card, cfg: StrictConfig | None = None) -> dict:
    """The cheap strict checks for per-epoch curves: forced prefix and target log-likelihood."""
    cfg = cfg or StrictConfig()
    forced = forced_prefix(Weights(model, tokenizer, card), cfg.prefix_fractions)
    loglik = target_loglik(model, tokenizer, card)
    return {"forced": sum(forced) / len(forced), "loglik": round(sum(loglik) / len(loglik), 4)}


def strict_verify(model: str, card, base: str | None = None, *, cfg: StrictConfig | None = None,
                  trust_remote_code: bool = False) -> dict:
    """`meraser verify --strict`: load the suspect (and the base, when given) and run the strict checks."""
    from meraser.models import check_model_spec, load_model

    c = Card.load(card)
    if not c.has_target_text:
        raise MeraserError(f"{c.method} cards have no target text for the strict checks to force or score: their "
                           f"own test is the z-test that `meraser verify` (the default test) reports")
    if base:
        check_model_spec(base, "--base")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    b = load_model(base, trust_remote_code=trust_remote_code)[0] if base else None
    return {"model": model, "method": c.method, **strict_check(m, tok, c, cfg, base=b)}
