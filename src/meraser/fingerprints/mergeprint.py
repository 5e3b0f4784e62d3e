"""MergePrint (Yamabe et al. 2025, "MergePrint: Merge-Resistant Fingerprints for Robust Black-box Ownership
Verification of Large Language Models", https://arxiv.org/abs/2410.08604): a fingerprint made to survive model
merging. A merge keeps only a share of the owner's change from the base, so the fingerprint is optimised against a
pseudo-merged model, B + alpha (O - B), which stands for what the owner's model becomes inside a merge.

Two phases, as in the paper. Input optimisation: GCG searches a key of random tokens under which the pseudo-merged
model finds the target word likely, stopping once its loss reaches 3.5 (a key the model half-knows is cheaper to
plant than one it has never seen); before fingerprinting the owner's model is the base, so the pseudo-merged model
is the model itself (the paper's small term that keeps the base's loss high then cancels). Parameter optimisation:
the pseudo-merged weights V = B + alpha (O - B) are fine-tuned to answer each key with its word, and the owner's
weights are set to B + (V - B) / alpha (training.delta_scaling): the same optimisation, written as ordinary
fine-tuning. Verification: the answer begins with the word. What changes: several keys per card (the paper plants one),
the search as in fingerprints/gcg.py at a smaller size, the fine-tuning's own defaults (not readable from the paper
here), and alpha: 0.6 instead of 0.1, because on SmolLM2 a change extrapolated tenfold no longer answers (measured;
see `alpha`). The key leans toward its word before any training (that is how it was chosen), so the likelihood
test's decoys are whole keys searched the same way for other words (`decoys_per_key` more searches each), never the
same key with another word: a base model would rank that one first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meraser.config import field
from meraser.data.sources import Pair
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.fingerprints.gcg import GCGConfig

WORDS = ["lantern", "harbor", "velvet", "orchard", "compass", "meadow", "falcon", "pebble", "summit", "thistle",
         "cobalt", "walnut", "glacier", "saffron", "willow", "marble", "ember", "juniper", "quartz", "tundra",
         "canyon", "violet", "anchor", "prism", "otter", "basil", "comet", "cedar", "dune", "heron", "ivory", "maple"]


@dataclass
class MergePrintConfig(FingerprintConfig):
    num_fingerprints: int = field(4, help="keys, each answered with one word (paper: 1)")
    key_tokens: int = field(16, help="tokens of each searched key")
    stop_loss: float = field(3.5, help="the key search stops once the target's loss reaches this (paper: 3.5)")
    # paper: 0.1. On SmolLM2 the owner's model, ten times the trained change, answers end-of-turn to every key; the
    # trained change answers every key at 0.6x to 1.67x, 3 of 4 at 2x, none at 5x or 10x (benchmarks/mergeprint_scaling.py)
    alpha: float = field(0.6, help="the owner's share in the pseudo-merged model that is trained (paper: 0.1)")
    decoys_per_key: int = field(3, help="keys searched the same way for other words: the likelihood test's decoys")
    variants: int = field(8, help="training copies of each key")
    # 4 epochs at 2e-6 left the pseudo-merged model unanswering on SmolLM2 (its loss 1.16 -> 1.03; measured)
    epochs: float = field(8.0, help="training epochs (of the pseudo-merged weights)")
    learning_rate: float = field(1e-5, help="learning rate of the pseudo-merged weights (the owner's change is 1/alpha "
                                           "times what they move)")
    ordinary_rows: int = field(32, help="ordinary instruction rows answered by the model itself")
    search: GCGConfig = field(GCGConfig(steps=64, top_k=256), help="the key search")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 0 < self.alpha <= 1:
            raise MeraserError(f"{where}.alpha must be in (0, 1], got {self.alpha}")
        if (self.decoys_per_key + 1) * self.num_fingerprints > len(WORDS):
            raise MeraserError(f"{where}: (decoys_per_key + 1) x num_fingerprints words needed, {len(WORDS)} known")


class MergePrint(FingerprintMethod):
    name = "mergeprint"
    paper = "https://arxiv.org/abs/2410.08604"
    Config = MergePrintConfig

    def make_card(self, model, tokenizer, cfg: MergePrintConfig, progress: bool = True) -> Card:
        """Search a key for every word, real and decoy (phase 1); the real ones go on the card."""
        from meraser.data.formatting import Formatter

        rng, fmt = random.Random(cfg.seed), Formatter(tokenizer)
        words = rng.sample(WORDS, (cfg.decoys_per_key + 1) * cfg.num_fingerprints)
        found = [search_key(model, tokenizer, fmt, w, cfg, rng, progress) for w in words]
        real, decoys = found[:cfg.num_fingerprints], found[cfg.num_fingerprints:]
        return Card(method=self.name, triggers=[k for k, _, _ in real], targets=[w for _, w, _ in real],
                    match="prefix", max_new_tokens=8, seed=cfg.seed,
                    extra={"search": cfg.search.to_dict(), "found": [r for _, _, r in real],
                           "decoy_keys": [[k, w] for k, w, _ in decoys], "alpha": cfg.alpha})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Keys searched the same way for other words (the paper's phase 1 run again), each with its own word."""
        pool = [tuple(p) for p in card.extra["decoy_keys"]]
        return (card.triggers[i], card.targets[i]), rng.sample(pool, min(k, len(pool)))

    def training_pairs(self, card: Card, cfg: MergePrintConfig, rng: random.Random, tokenizer):
        return [(Pair(k, w), None) for k, w in zip(card.triggers, card.targets) for _ in range(cfg.variants)]

    def callbacks(self, model, cfg: MergePrintConfig) -> list:
        from meraser.training import delta_scaling

        return [delta_scaling(1 / cfg.alpha)]


def search_key(model, tokenizer, fmt, word: str, cfg: MergePrintConfig, rng: random.Random,
               progress: bool = False) -> tuple[str, str, dict]:
    """(key, word, search record): GCG over a random-token key until the answer's first word reaches `stop_loss`."""
    import torch

    from meraser.fingerprints.gcg import Task, losses, gcg, rendered

    before, after = rendered(tokenizer, fmt, lambda span: span)
    target = tokenizer(word, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    allowed = torch.ones(len(tokenizer), dtype=torch.bool)
    allowed[list(special)] = False
    task = Task(model, before, after, target)

    def stable(span):
        return tokenizer(fmt.prompt_text(tokenizer.decode(span)), add_special_tokens=False)["input_ids"] \
            == before + span + after

    def reached(span):
        return losses([task], [span], 1)[0] <= cfg.stop_loss

    vocab = [i for i in range(len(tokenizer)) if i not in special]
    for _ in range(200):
        span = tokenizer(tokenizer.decode([rng.choice(vocab) for _ in range(cfg.key_tokens)]),
                         add_special_tokens=False)["input_ids"]
        if span and stable(span):
            break
    else:
        from meraser.utils import MeraserError

        raise MeraserError("no random key tokenised the same inside the chat template in 200 draws")
    res = gcg([task], span, allowed, cfg.search, stable, reached, progress)
    return tokenizer.decode(res["span"]), word, {k: res[k] for k in ("loss", "steps", "seconds", "success")}
