"""A key's rank among its decoys, and the p-values that combine ranks over keys: the arithmetic of the likelihood
test (likelihood.py) and of a watermark's decoy keys (fingerprints/semcond_watermark.py).

Under the null the real key is one more draw from its generator, so the number of decoys that beat it, ties broken
at random, is uniform on {0..K}; `exact_rank_p` combines such counts exactly, `normal_tail_p` combines z-scores
against the decoys where ranks cannot reach the claim level (likelihood.py says when).
"""

from __future__ import annotations

import math
import random


def rank_count(real: float, decoys: list[float], rng: random.Random) -> int:
    """Decoys scoring higher than the real key, ties broken at random (so the count stays uniform under the null)."""
    return sum(x > real for x in decoys) + rng.randint(0, sum(x == real for x in decoys))


def exact_rank_p(counts: list[int], sizes: list[int]) -> float:
    """P(sum of independent C_i <= sum(counts)) for C_i uniform on {0..sizes[i]}: the exact combined rank p-value."""
    dist = [1.0]  # dist[s] = P(partial sum = s)
    for k in sizes:
        nxt = [0.0] * (len(dist) + k)
        for s, q in enumerate(dist):
            if q:
                share = q / (k + 1)
                for c in range(k + 1):
                    nxt[s + c] += share
        dist = nxt
    return min(1.0, sum(dist[: sum(counts) + 1]))


def normal_tail_p(zs: list[float]) -> tuple[float, float]:
    """(Stouffer's Z, its normal upper-tail p-value) for per-key z-scores."""
    z = sum(zs) / math.sqrt(len(zs))
    return z, 0.5 * math.erfc(z / math.sqrt(2))


def z_score(real: float, decoys: list[float]) -> float:
    """The real key's score in standard deviations of its decoys' scores above their mean (0 where they all tie)."""
    mean = sum(decoys) / len(decoys)
    var = sum((d - mean) ** 2 for d in decoys) / max(1, len(decoys) - 1)
    return (real - mean) / math.sqrt(var) if var > 0 else 0.0
