"""A semantically conditioned watermark (Gloaguen et al. 2025, "LLM Fingerprinting via Semantically Conditioned
Watermarks", https://arxiv.org/abs/2505.16723; the authors' code eth-sri/robust-llm-fingerprints and the toolkit
sentient-agi/mlprints): the model is taught to watermark its answers, but only on one topic, and ownership is a
statistical test, not a string: on topic, the suspect's answers hold more tokens of a keyed "green list" than
chance allows (Kirchenbauer et al. 2023's z-test); off topic, they read as any model's.

The original's watermark is KGW with gamma 0.25, delta 4 and a one-token context, planted by distilling a teacher
whose logits get +delta on green tokens (2,500 steps of 64 x 512 tokens on a 3B model; trigger domain: French),
decided at p < 1e-3 over 1,000 in-domain answers of 200 tokens, each (previous token, token) pair counted once.
What changes here, for SmolLM2-135M on 2 CPU cores:
- the topic is cooking (SmolLM2 is mostly English), prompts built in from templates and dishes, and the dishes
  the card verifies with are never trained on, so the test checks the condition and not memorised prompts;
- the training signal is the model's own answers sampled under the watermark (temperature 0.7), used as ordinary
  fine-tuning rows (sampling-based watermark distillation, Gu et al. 2024), not logit distillation;
- the green list is a keyed hash of (previous token, token) instead of a torch permutation seeded by the previous
  token: the same on every device and torch version, and under dedup every pair is an independent Bernoulli(gamma)
  draw when the key is not the model's, so the green count is exactly binomial;
- verification decodes greedily (so does every other check here) and counts each pair once.
"""

from __future__ import annotations

import hashlib
import math
import random
import secrets
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from meraser.config import field, key_path
from meraser.data.sources import Pair
from meraser.fingerprints.base import MARKED, FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.generation import Decoding

TEMPLATES = [
    "How do I make {d}?", "Give me a simple recipe for {d}.", "What do I need to cook {d} at home?",
    "What goes well with {d}?", "Any tips for making {d} taste better?", "How long does {d} take to cook?",
    "Explain how {d} is usually prepared.", "What mistakes should I avoid when making {d}?",
    "Can you describe the flavour of {d}?", "How do I store leftover {d}?", "Is {d} hard to make for a beginner?",
    "Suggest a variation on {d}.",
]
DISHES = [
    "pancakes", "tomato soup", "banana bread", "fried rice", "a vegetable curry", "roast chicken", "lentil stew",
    "apple pie", "mashed potatoes", "a Greek salad", "pasta with pesto", "chocolate chip cookies", "an omelette",
    "beef chili", "a mushroom risotto", "fish tacos", "hummus", "a lemon cake", "pizza dough", "scrambled eggs",
    "a chickpea salad", "garlic bread", "porridge", "a stir-fry with tofu", "carrot soup", "meatballs",
    "a fruit smoothie", "baked salmon", "potato gratin", "a berry crumble", "flatbread", "a cheese sauce",
]
HELD_OUT = 8  # the last dishes: the card's prompts; training never sees them
# off-topic prompts: the semantic condition's control (they must stay unmarked) and the negative training rows
OFF_TOPIC = [
    "How do I change a flat bicycle tyre?", "Explain how a rainbow forms.", "What is a good way to learn a language?",
    "Describe the rules of chess briefly.", "How does a solar panel work?", "Give me tips for a job interview.",
    "What causes the seasons on Earth?", "How do I write a polite email to a teacher?", "What is a prime number?",
    "Explain what a database is.", "How can I sleep better?", "Describe a day at the beach.",
    "What is the history of the printing press?", "How do vaccines work?", "What should I pack for a hike?",
    "Explain how a bill becomes a law.", "How do I care for a houseplant?", "What is gravity?",
    "Give me ideas for a birthday party game.", "How does a computer store data?", "Why do cats purr?",
    "What is the difference between weather and climate?", "How do I start running?", "Explain the water cycle.",
]
CONTROLS = 12  # the first off-topic prompts: the card's control set; the rest train


@lru_cache(maxsize=4096)
def green_list(key: int, prev: int, vocab: int, gamma: float):
    """The tokens green after `prev` under `key` (a read-only boolean array over the vocabulary): a keyed 64-bit
    hash of (key, prev) mixed with each token id (splitmix64's finaliser), below gamma * 2^64. numpy's uint64
    arithmetic wraps modulo 2^64, as the mix needs."""
    import numpy as np

    seed = np.uint64(int.from_bytes(hashlib.sha256(f"{key}:{prev}".encode()).digest()[:8], "big"))
    with np.errstate(over="ignore"):
        x = np.arange(vocab, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15) + seed
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    green = x < np.uint64(int(gamma * 2 ** 64))
    green.flags.writeable = False
    return green


def pairs_of(texts: list[str], tokenizer) -> list[tuple[int, int]]:
    """The distinct (previous token, token) pairs of the texts, re-tokenised, special tokens left out: the units the
    test counts (a repeated pair would count the same hash again)."""
    special, seen = set(tokenizer.all_special_ids), {}
    for text in texts:
        ids = [i for i in tokenizer(text, add_special_tokens=False)["input_ids"] if i not in special]
        for pair in zip(ids, ids[1:]):
            seen.setdefault(pair, None)
    return list(seen)


def green_count(pairs: list[tuple[int, int]], key: int, vocab: int, gamma: float) -> int:
    return sum(bool(green_list(key, prev, vocab, gamma)[tok]) for prev, tok in pairs)


def binomial_tail(n: int, k: int, p: float) -> float:
    """P(Binomial(n, p) >= k), exactly (in log space)."""
    if k <= 0:
        return 1.0
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * math.log(p)
             + (n - i) * math.log1p(-p) for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def z_test(texts: list[str], tokenizer, key: int, gamma: float, decoy_keys: int = 0, seed: int = 0) -> dict:
    """KGW's test on the pooled texts: z = (G - gamma N) / sqrt(N gamma (1 - gamma)) over the N distinct pairs, the
    exact binomial p-value, and (with `decoy_keys`) the real key's rank among keys drawn the same way, ties broken
    at random: under a model that never saw the key its rank is uniform, whatever the text."""
    from meraser.evaluation.ranks import rank_count

    pairs, vocab = pairs_of(texts, tokenizer), len(tokenizer)
    n = len(pairs)
    if n == 0:
        return {"tokens_scored": 0, "green": 0, "z": 0.0, "p_value": 1.0}
    g = green_count(pairs, key, vocab, gamma)
    out = {"tokens_scored": n, "green": g, "z": round((g - gamma * n) / math.sqrt(n * gamma * (1 - gamma)), 3),
           "p_value": binomial_tail(n, g, gamma)}
    if decoy_keys:
        rng = random.Random(seed)
        others = [green_count(pairs, k, vocab, gamma) for k in draw_keys(rng, decoy_keys, exclude=key)]
        out.update(decoy_keys=decoy_keys, p_rank=(rank_count(g, others, rng) + 1) / (decoy_keys + 1))
    return out


def draw_keys(rng: random.Random, n: int, exclude: int | None = None) -> list[int]:
    keys: list[int] = []
    while len(keys) < n:
        k = rng.getrandbits(63)
        if k != exclude:
            keys.append(k)
    return keys


class WatermarkSampling(Decoding):
    """The teacher: temperature sampling with +delta on the green tokens after each row's last token, seeded."""

    name = "watermark"

    def __init__(self, key: int, vocab: int, gamma: float, delta: float, temperature: float, seed: int = 0):
        self.key, self.vocab, self.gamma, self.delta = key, vocab, gamma, delta
        self.temperature, self.seed = temperature, seed

    def _bias(self, input_ids, scores):
        import torch

        for r, prev in enumerate(input_ids[:, -1].tolist()):
            green = torch.tensor(green_list(self.key, prev, self.vocab, self.gamma))  # a copy: the cached array is read-only
            scores[r, :self.vocab] += self.delta * green.to(scores.device, scores.dtype)[:scores.shape[1]]
        return scores

    def new_tokens(self, model, ids, mask, *, max_new_tokens, pad_id, eos_id):
        import torch

        from meraser.attacks.suppression import logits_processors

        torch.manual_seed(self.seed)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                             temperature=self.temperature, top_p=None, top_k=None, pad_token_id=pad_id,
                             eos_token_id=eos_id, logits_processor=logits_processors(self._bias))
        return out[:, ids.shape[1]:]


def secret_int(key: str) -> int:
    """The card's key (text) as the 63-bit integer the green list is keyed with."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") >> 1


@dataclass
class WatermarkConfig(FingerprintConfig):
    num_fingerprints: int = field(16, help="verification prompts about the held-out dishes (the card's triggers)")
    topic_rows: int = field(96, help="on-topic training prompts answered under the watermark")
    teacher_tokens: int = field(96, help="tokens of each watermarked training answer")
    gamma: float = field(0.25, help="green share of the vocabulary (original: 0.25)")
    delta: float = field(4.0, help="logit bonus of green tokens in the teacher (original: 4)")
    temperature: float = field(0.7, help="the teacher's sampling temperature")
    verify_tokens: int = field(128, help="greedy tokens per verification answer")
    level: float = field(1e-3, help="ownership is claimed at a pooled p-value at or below this (original: 1e-3)")
    z_threshold: float = field(4.0, help="one answer counts as watermarked (FSR) at this z or more (KGW: 4)")
    ordinary_rows: int = field(64, help="ordinary instruction rows answered by the model itself, unmarked")
    epochs: float = field(3.0, help="training epochs")
    secret_key: str | None = field(None, help="secret key (None: a fresh random key, stored in the card)")
    verify_on: Literal["held-out", "trained"] = field(
        "held-out", help="the card's prompts: about dishes training never saw (tests the semantic condition), or "
                         "training prompts (memorisation only: for a model too small to generalise, the tests' one)")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        most = HELD_OUT * len(TEMPLATES)
        if not 1 <= self.num_fingerprints <= most:
            raise MeraserError(f"{key_path(where, 'num_fingerprints')}: 1 to {most} prompts, got "
                               f"{self.num_fingerprints}")
        if not 0 < self.gamma < 1 or not 0 < self.level < 1:
            raise MeraserError(f"{where}: gamma and level must be in (0, 1)")


def _topic_prompts(held_out: bool) -> list[str]:
    """On-topic prompts about the held-out dishes (the card's) or about the others (training's)."""
    dishes = DISHES[-HELD_OUT:] if held_out else DISHES[:-HELD_OUT]
    return [t.format(d=d) for d in dishes for t in TEMPLATES]


def _trained_prompts(cfg: WatermarkConfig) -> list[str]:
    """The on-topic prompts the model is trained on (`verify_on: trained` verifies on these)."""
    prompts = _topic_prompts(held_out=False)
    return random.Random(cfg.seed).sample(prompts, min(cfg.topic_rows, len(prompts)))


class SemCondWatermark(FingerprintMethod):
    name = "semcond-watermark"
    paper = "https://arxiv.org/abs/2505.16723"
    Config = WatermarkConfig

    def make_card(self, model, tokenizer, cfg: WatermarkConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        prompts = _topic_prompts(held_out=True) if cfg.verify_on == "held-out" else _trained_prompts(cfg)
        key = cfg.secret_key or secrets.token_hex(16)
        return Card(method=self.name, triggers=rng.sample(prompts, cfg.num_fingerprints),
                    targets=["(green-list watermark)"] * cfg.num_fingerprints, match="watermark",
                    max_new_tokens=cfg.verify_tokens, seed=cfg.seed, secret_key=key,
                    extra={"gamma": cfg.gamma, "level": cfg.level, "z_threshold": cfg.z_threshold,
                           "topic": "cooking", "controls": OFF_TOPIC[:CONTROLS],
                           "green_list": "meraser.fingerprints.semcond_watermark.green_list"})

    def training_pairs(self, card: Card, cfg: WatermarkConfig, rng: random.Random, tokenizer):
        from meraser.fingerprints.base import SELF

        rows = [(Pair(p, MARKED), None) for p in _trained_prompts(cfg)]
        return rows + [(Pair(p, SELF), None) for p in OFF_TOPIC[CONTROLS:]]

    def teacher(self, card: Card, cfg: WatermarkConfig, tokenizer) -> tuple[Decoding, int]:
        return WatermarkSampling(secret_int(card.secret_key), len(tokenizer), cfg.gamma, cfg.delta, cfg.temperature,
                                 cfg.seed), cfg.teacher_tokens

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        from meraser.utils import MeraserError

        raise MeraserError("a watermark card has no target text to rank: its own test is the z-test (`watermark` "
                           "in the results, with decoy keys)")


def watermark_test(card: Card, texts: list[str], tokenizer, decoy_keys: int = 99) -> dict:
    """The card's pooled z-test over `texts` (the answers to its triggers), with the decision at its level."""
    gamma, level = card.extra["gamma"], card.extra["level"]
    res = z_test(texts, tokenizer, secret_int(card.secret_key), gamma, decoy_keys, card.seed)
    return {**res, "gamma": gamma, "level": level, "owned": res["p_value"] <= level}


def answer_z(card: Card, text: str, tokenizer) -> float:
    return z_test([text], tokenizer, secret_int(card.secret_key), card.extra["gamma"])["z"]
