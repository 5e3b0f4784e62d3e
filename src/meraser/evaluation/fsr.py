"""Fingerprint success rate (FSR): the fraction of a card's triggers whose greedy output matches the target.

Generation is batched (left padding, one `generate` call per batch). IF-SFT cards prefill a response prefix;
the compared text is prefill + generated continuation. A false-positive rate on inputs that are not triggers
(random token strings as in the UTF paper, and ordinary prompts; decoded without any prefill) guards against a
model that says the target to everything being counted as fingerprinted.
"""

from __future__ import annotations

from typing import Callable

from meraser.evaluation.suspect import Weights, answers
from meraser.evaluation.probes import ORDINARY_PROMPTS, random_token_prompts
from meraser.fingerprints.card import Card, matches

def _hits(card: Card, outs: list[str], tokenizer) -> list[bool]:
    """Which answers show the fingerprint: they match their target, or for a watermark card (no target text) each
    answer's own z-test reaches the card's threshold."""
    if card.match == "watermark":
        from meraser.fingerprints.semcond_watermark import answer_z

        return [answer_z(card, o, tokenizer) >= card.extra["z_threshold"] for o in outs]
    return [matches(o, t, card.match) for o, t in zip(outs, card.targets)]


def fsr(model, tokenizer, card: Card, *, batch_size: int = 16, false_positive_inputs: int = 32,
        seed: int = 0, decoding=None) -> dict:
    """FSR over the card, per-trigger outputs, and the false-positive rate on non-trigger inputs (all generated
    through `decoding`, plain greedy by default)."""
    suspect = Weights(model, tokenizer, card, decoding, batch_size=batch_size)
    return fsr_of(lambda p, f: answers(suspect, p, f), tokenizer, card, false_positive_inputs=false_positive_inputs,
                  seed=seed)


def fsr_of(answer: Callable[[list[str], list[str] | None], list[str]], tokenizer, card: Card, *,
           false_positive_inputs: int = 32, seed: int = 0) -> dict:
    """`fsr` over any source of answers: `answer(prompts, prefills)` gives each prompt's answer as compared with the
    target (its prefill, where one was sent, then the continuation): a local model, or a served one (served.py)."""
    prefills = card.prefills or None
    outs = answer(card.triggers, prefills)
    hits = _hits(card, outs, tokenizer)
    result = {
        "fsr": sum(hits) / len(hits),
        "per_trigger": [{"trigger": tr, "target": ta, "output": o, "match": h}
                        for tr, ta, o, h in zip(card.triggers, card.targets, outs, hits)],
    }
    if card.match == "watermark":  # its own test, pooled over the answers, and over off-topic controls beside it
        from meraser.fingerprints.semcond_watermark import watermark_test

        controls = answer(card.extra["controls"], None)
        result["watermark"] = {**watermark_test(card, outs, tokenizer),
                               "control": watermark_test(card, controls, tokenizer, decoy_keys=0)}
    if false_positive_inputs:
        result.update(_false_positives(answer, tokenizer, card, false_positive_inputs, seed))
    return result


def _false_positives(answer, tokenizer, card: Card, n: int, seed: int) -> dict:
    probes = (random_token_prompts(tokenizer, n // 2, seed) + ORDINARY_PROMPTS)[:n]
    targets = list(dict.fromkeys(card.targets))
    # no prefill here: a forced lead-in (IF-SFT) makes every input look like a trigger; the question is whether
    # the target comes out of a non-trigger input by itself
    fp_outs = answer(probes, None)
    if card.match == "watermark":  # an answer is watermarked by itself: the same rule as for the triggers
        fp = _hits(card, fp_outs, tokenizer)
    elif card.match == "prefix":  # many one-word targets (Perinucleus): some answer begins with one of them by
        # chance, so each probe is paired with one target, as a key is, and the pair must match
        fp = [matches(o, targets[i % len(targets)], card.match) for i, o in enumerate(fp_outs)]
    else:
        fp = [any(matches(o, t, card.match) for t in targets) for o in fp_outs]
    return {"false_positive_rate": sum(fp) / len(fp), "false_positive_inputs": len(fp)}
