"""Ownership as a statistical decision: how unlikely are the observed matches for a model never fingerprinted?

With many keys an owner does not ask "is FSR 100%?" but "could a model that does not carry my fingerprint match this
many keys by chance?". Under that null each trigger i matches independently with probability p_i, the chance that
a model like the reference (the clean base, or any model the owner trusts to be unmarked) answers trigger i with
its target: here, the reference's probability of beginning its answer (after any prefill) with the whole target.
The number of matches is then Poisson-binomial, and the p-value is its upper tail at the observed count. For
`substring` cards the target may also appear later in an answer, which this probability does not count, so the
p-value is a lower estimate there; for targets of several tokens it is far below any decision level either way.
Without a reference model there is no p-value: `ownership` is not guessed.
"""

from __future__ import annotations

import math

CLAIM_LEVEL = 1e-6  # the owner claims the model when the p-value is below this


def target_logprobs(model, tokenizer, card) -> list[float]:
    """log P(answer begins with the target | trigger, prefill) under `model`, per trigger."""
    from meraser.evaluation.suspect import target_token_logprobs

    return [sum(lp) for lp in target_token_logprobs(model, tokenizer, card)]


def upper_tail(probabilities: list[float], k: int) -> float:
    """P(X >= k) for X the number of successes of independent Bernoulli(p_i): the Poisson-binomial tail, exact by
    dynamic programming over the count (O(n^2); n is at most a few thousand keys)."""
    if k <= 0:
        return 1.0
    dist = [1.0]  # dist[j] = P(j successes so far)
    for p in probabilities:
        nxt = [0.0] * (len(dist) + 1)
        for j, q in enumerate(dist):
            nxt[j] += q * (1 - p)
            nxt[j + 1] += q * p
        dist = nxt
    return min(1.0, sum(dist[k:]))


def p_text(p: float) -> str:
    """A p-value as printed: below float range (the tail underflows past ~1e-308) shown as such, not as 0."""
    return "< 1e-300" if p == 0 else f"{p:.2g}"


def ownership(matches: list[bool], reference_logprobs: list[float], level: float = CLAIM_LEVEL) -> dict:
    """The p-value of at least `sum(matches)` matches under the reference's probabilities, and the decision."""
    ps = [math.exp(lp) for lp in reference_logprobs]
    p_value = upper_tail(ps, sum(matches))
    return {"p_value": p_value, "claim": p_value < level, "level": level, "matches": sum(matches),
            "keys": len(matches), "expected_matches_by_chance": sum(ps)}
