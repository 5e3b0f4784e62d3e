"""The likelihood ownership test: is the card's key likelier under the suspect than keys that were never planted?

A fingerprint's key has a random part: Chain & Hash's answers (a hash of a secret key), UTF's under-trained-token
target, Perinucleus' token drawn just outside the nucleus, IF-SFT's scrambled message, subject-sentence's subject.
Each method draws **decoys** from the same generator (`FingerprintMethod.decoys`; cards made with `meraser card`
carry their own list). Every (trigger, target) pair, the real one and its decoys, is scored by the suspect alone:
the mean log-probability per target token after the trigger (and any prefill), teacher-forced, forward passes only.

Under the null (the suspect never saw this key: the base, a sibling, a model fingerprinted with another key) the real
key is one more draw from the generator, so its rank among its decoys is uniform whatever the suspect prefers. Per
key, c_i = the number of decoys scoring higher than the real pair is uniform
on {0..K_i}. Scores tie often (a bf16 forward pass rounds log-probabilities to steps of 1/8 on SmolLM2: Perinucleus'
neighbouring tokens tie in most keys), and a tie counted against the owner makes c_i too large under the null (the
base model's p-value was 0.997 on a Perinucleus card): ties are broken at random, seeded, which keeps c_i exactly
uniform under the null. The keys' sum C is then a sum of independent discrete uniforms, and P(C <= c) is computed **exactly**
by convolution: the `exact` p-value, with no base model and no control. Its smallest value is prod 1/(K_i + 1), so
a card with few keys (UTF has one) cannot reach the claim level by rank. There the **normal tail** is used: each
real score as a z-score against its decoys' mean and standard deviation, combined by Stouffer's rule, p = the
normal upper tail. That tail is a model of the decoys' scores, not a theorem: trust it only where the controls
show its p-values uniform (README). The verdict uses the exact p-value where it can reach the level, else the tail,
and says which.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from meraser.config import Config, field
from meraser.evaluation.ranks import exact_rank_p, normal_tail_p, rank_count, z_score
from meraser.evaluation.suspect import pair_rows
from meraser.fingerprints.base import recorded_decoys
from meraser.fingerprints.card import Card
from meraser.utils import MeraserError

Pair = tuple[str, str]  # (trigger, target)


@dataclass
class LikelihoodConfig(Config):
    decoys: int | None = field(None, help="decoy keys per real key (a method with fewer possible decoys uses all "
                                          "of them); None: FEW_DECOYS where the keys' exact p-value can then still "
                                          "fall 1000x below the level, else MANY_DECOYS")
    level: float = field(1e-6, help="claim ownership when the p-value is at most this")
    seed: int = field(0, help="seed for drawing the decoys")
    batch_size: int = field(32, help="sequences scored per forward pass")

    def validate(self, where: str) -> None:
        if self.decoys is not None and self.decoys < 1:
            raise MeraserError(f"{where}.decoys must be at least 1, got {self.decoys}")
        if not 0 < self.level < 1:
            raise MeraserError(f"{where}.level must be in (0, 1), got {self.level}")


# The cost is one scored sequence per decoy. A card with several keys reaches tiny exact p-values with few decoys
# each (eight keys x 19: floor 4e-11); one with few keys needs many for the normal tail's fit (measured on SmolLM2:
# with 99 decoys a key the test took 5.4x the strict checks' time, benchmarks/likelihood_cost.py)
FEW_DECOYS, MANY_DECOYS = 19, 99


def shared_draw(card: Card) -> bool:
    """Whether the card's keys share one random draw (`FingerprintMethod.draws_shared`): then they are one unit."""
    from meraser.fingerprints import REGISTRY

    return card.method in REGISTRY and REGISTRY[card.method].draws_shared(card)


def independent_units(card: Card) -> int:
    return 1 if shared_draw(card) else len(card.triggers)


def decoys_per_key(card: Card, cfg: LikelihoodConfig) -> int:
    if cfg.decoys is not None:
        return cfg.decoys
    return FEW_DECOYS if (FEW_DECOYS + 1) ** -independent_units(card) <= cfg.level / 1000 else MANY_DECOYS


def keys_and_decoys(card: Card, cfg: LikelihoodConfig) -> list[tuple[Pair, list[Pair]]]:
    """(real pair, decoy pairs) per key: the method's generator, or the decoy targets a hand-made card records.
    A decoy never equals its real pair. Where a method lists every possible decoy (Chain & Hash, Perinucleus), a
    random subset of `decoys_per_key` of them is taken: the real key with a random subset of the others is still
    exchangeable. The draw is seeded by the test's seed and the card's checksum: with the test's seed alone every
    card met the same decoys, so one unlucky decoy draw moved every card's p-value together."""
    from meraser.fingerprints import REGISTRY

    rng, k = decoy_rng(card, cfg), decoys_per_key(card, cfg)
    start, shared = rng.getstate(), shared_draw(card)
    out = []
    for i in range(len(card.triggers)):
        if shared:  # the same decoy draws for every key: decoy j is one other subject across all questions
            rng.setstate(start)
        if card.method in REGISTRY:
            real, decoys = REGISTRY[card.method].decoys(card, i, k, rng)
        else:
            real, decoys = recorded_decoys(card, i, k, rng)
        decoys = [d for d in dict.fromkeys(decoys) if d != real]
        if len(decoys) > k:
            decoys = rng.sample(decoys, k)
        if not decoys:
            raise MeraserError(f"card method '{card.method}': no decoy differs from key {i}'s target")
        out.append((real, decoys))
    return out


def decoy_rng(card: Card, cfg: LikelihoodConfig) -> random.Random:
    """The decoys' random source: one per (test seed, card), so different cards draw independent decoys."""
    return random.Random(f"{cfg.seed}-{card.checksum}")


def pair_scores(model, tokenizer, card: Card, pairs: list[Pair], prefills: list[str],
                batch_size: int = 32, progress: bool = False) -> list[float]:
    """Mean log-probability per target token after each trigger (and its prefill), teacher-forced: forward passes
    only. Rows go in batches that share as much prompt as they can: a key and its decoy targets (one prompt) batch
    together, rows with prompts of their own (decoy triggers) in lexical order (the system turn and the question's
    opening are common). Each batch's common prompt prefix runs once and its cache serves every row (measured by
    benchmarks/likelihood_cost.py: IF-SFT's prompt is ~10x its target). `progress` shows a bar."""
    import torch

    from meraser.models import autocast, pad_id

    rows = pair_rows(tokenizer, card, pairs, prefills)
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for i, (prompt, _) in enumerate(rows):
        by_prompt.setdefault(tuple(prompt), []).append(i)
    alone = sorted((g[0] for g in by_prompt.values() if len(g) == 1), key=lambda i: rows[i][0])
    groups = [g for g in by_prompt.values() if len(g) > 1] + [alone]
    batches = [g[a:a + batch_size] for g in groups for a in range(0, len(g), batch_size)]
    pad = pad_id(tokenizer)
    scores = [0.0] * len(rows)
    if progress:
        from meraser.utils import track

        batches = track(batches, f"scoring {len(rows)} keys and decoys")
    with torch.no_grad(), autocast(model):
        for batch in batches:
            for i, s in zip(batch, _prefix_cached_scores(model, [rows[i] for i in batch], pad)):
                scores[i] = s
    return scores


def batch_scores(model, rows: list[tuple[list[int], list[int]]], pad: int) -> list[float]:
    """Scores of one batch of (prompt, target) rows, each run whole, right-padded to the longest. Only positions
    from the shortest prompt's last token on go through the LM head and the softmax: on a 49k vocabulary those are
    most of the cost, and no earlier position predicts a target token."""
    import torch

    from meraser.models import padded

    ids, mask = padded([p + t for p, t in rows], pad, device=next(model.parameters()).device)
    first = min(len(p) for p, _ in rows) - 1  # the first position whose logits are read
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=ids.shape[1] - first).logits
    logp = torch.log_softmax(logits.float(), -1)
    return [_mean_at(logp[r, len(p) - 1 - first:len(p) - 1 - first + len(t)], t) for r, (p, t) in enumerate(rows)]


def _prefix_cached_scores(model, rows: list[tuple[list[int], list[int]]], pad: int) -> list[float]:
    """Scores of one batch of rows: the prompts' common prefix runs once, and its cache, repeated, is the past of
    every row's remainder (the rest of its prompt, at least its last token, then its target), right-padded so each
    token keeps the position it has in the whole row. In fp32 the scores are `batch_scores`' (tested)."""
    import torch

    from meraser.models import encode_prefix, shared_past

    shared = _common_prefix([p for p, _ in rows])
    if shared == 0:
        return batch_scores(model, rows, pad)
    dev = next(model.parameters()).device
    cache = encode_prefix(model, rows[0][0][:shared])
    if cache is None:  # a model that keeps no cache: each row whole
        return batch_scores(model, rows, pad)
    tails = [p[shared:] + t[:-1] for p, t in rows]  # a target's last token is never an input
    longest = max(map(len, tails))
    ids = torch.full((len(rows), longest), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), shared + longest), dtype=torch.long)
    mask[:, :shared] = 1
    for r, tail in enumerate(tails):
        ids[r, :len(tail)], mask[r, shared:shared + len(tail)] = torch.tensor(tail), 1
    logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), **shared_past(model, cache, len(rows))).logits
    logp = torch.log_softmax(logits.float(), -1)
    return [_mean_at(logp[r, len(p) - shared - 1:len(p) - shared - 1 + len(t)], t) for r, (p, t) in enumerate(rows)]


def _common_prefix(prompts: list[list[int]]) -> int:
    """Tokens every prompt begins with, short of the shortest prompt's last (which predicts its target's first)."""
    n, cap = 0, min(map(len, prompts)) - 1
    while n < cap and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def _mean_at(logp, target: list[int]) -> float:
    """Mean of the log-probabilities `logp[j, target[j]]`."""
    import torch

    return logp.gather(1, torch.tensor(target, device=logp.device)[:, None]).mean().item()


def likelihood_test(model, tokenizer, card: Card, cfg: LikelihoodConfig | None = None, base=None,
                    progress: bool = False) -> dict:
    """The test on a loaded suspect (and, given `base` with the same tokenizer, the same statistics under the base
    beside it, for reference: the decision never needs it)."""
    cfg = cfg or LikelihoodConfig()
    keys = keys_and_decoys(card, cfg)

    def scorer(m):
        return lambda pairs, prefills: pair_scores(m, tokenizer, card, pairs, prefills, cfg.batch_size, progress)

    result = statistics(scorer(model), card, keys, cfg)
    if base is not None:
        result["base"] = {k: v for k, v in statistics(scorer(base), card, keys, cfg).items() if k != "per_key"}
        result["score_gap_vs_base"] = round(result["real_score"] - result["base"]["real_score"], 4)
    return {"method": card.method, "keys": len(keys), **result}


def statistics(score, card: Card, keys: list[tuple[Pair, list[Pair]]], cfg: LikelihoodConfig) -> dict:
    """The test's statistics, with `score(pairs, prefills)` giving each pair's mean target log-probability per token
    (`pair_scores` on a local model; served.py scores through a server's prompt log-probabilities)."""
    prefills = card.trigger_prefills
    pairs, pre = [], []
    for i, (real, decoys) in enumerate(keys):
        pairs += [real, *decoys]
        pre += [prefills[i]] * (1 + len(decoys))
    scores = score(pairs, pre)
    per_key, at, rng = [], 0, random.Random(cfg.seed)
    for real, decoys in keys:
        s, d = scores[at], scores[at + 1:at + 1 + len(decoys)]
        at += 1 + len(decoys)
        per_key.append({"score": round(s, 4), "decoys": len(d), "higher": sum(x > s for x in d),
                        "ties": sum(x == s for x in d), "rank_count": rank_count(s, d, rng),
                        "decoy_mean": round(sum(d) / len(d), 4), "z": round(z_score(s, d), 3)})
    units = _shared_unit(scores, keys, rng) if shared_draw(card) else per_key
    counts, sizes = [k["rank_count"] for k in units], [k["decoys"] for k in units]
    p_exact = exact_rank_p(counts, sizes)
    floor = math.prod(1 / (k + 1) for k in sizes)  # the exact p-value's smallest possible value
    z, p_tail = normal_tail_p([k["z"] for k in units])
    rule = "exact rank" if floor <= cfg.level else "normal tail"
    p = p_exact if rule == "exact rank" else p_tail
    return {"p_value": p, "rule": rule, "owned": p <= cfg.level, "level": cfg.level, "p_exact": p_exact,
            "p_exact_floor": floor, "p_normal_tail": p_tail, "stouffer_z": round(z, 3),
            "real_score": round(sum(k["score"] for k in per_key) / len(per_key), 4), "per_key": per_key}


def _shared_unit(scores: list[float], keys, rng: random.Random) -> list[dict]:
    """The card as one unit, where its keys share one random draw: the keys' mean score for the real draw and for
    each decoy draw (aligned across keys), ranked as one key. Treating such keys as independent multiplies one
    draw's luck: the base model's p-value was 0.998 on a subject-sentence card for every control."""
    n = min(len(d) for _, d in keys)
    real, decoys, at = 0.0, [0.0] * n, 0
    for _, d in keys:
        real += scores[at] / len(keys)
        for j in range(n):
            decoys[j] += scores[at + 1 + j] / len(keys)
        at += 1 + len(d)
    return [{"decoys": n, "rank_count": rank_count(real, decoys, rng), "z": round(z_score(real, decoys), 3)}]


def likelihood_verify(model: str, card, base: str | None = None, *, cfg: LikelihoodConfig | None = None,
                      trust_remote_code: bool = False, progress: bool = False) -> dict:
    """`meraser verify --test likelihood`: load the suspect (and the base, when given) and run the test."""
    from meraser.models import check_model_spec, load_model

    c = Card.load(card)
    cfg = cfg or LikelihoodConfig()
    keys_and_decoys(c, cfg)  # a card with no decoy scheme is refused before any model loads
    if base:
        check_model_spec(base, "--base")
    m, tok = load_model(model, trust_remote_code=trust_remote_code)
    check_tokenizer(c, tok, model)
    b = None
    if base:
        b, base_tok = load_model(base, trust_remote_code=trust_remote_code)
        check_tokenizer(c, base_tok, base)
    return {"model": model, **likelihood_test(m, tok, c, cfg, base=b, progress=progress)}


def tokenizer_digest(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary: cards record it, and a suspect with another one is refused (its
    scores would be over other tokens)."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def check_tokenizer(card: Card, tokenizer, where: str) -> None:
    recorded = card.extra.get("tokenizer")
    if recorded and recorded != tokenizer_digest(tokenizer):
        raise MeraserError(f"{where}: its tokenizer is not the one the card was made with (vocabulary hash "
                           f"{tokenizer_digest(tokenizer)}, card {recorded}); the likelihood test compares token "
                           f"probabilities, so it needs the fingerprinted model's own tokenizer")
