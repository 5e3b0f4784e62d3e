"""UTF: fingerprints from under-trained tokens (Cai et al. 2024, "UTF: Undertrained Tokens as Fingerprints",
https://arxiv.org/abs/2410.12318), with the detection idea of Land & Bartolo 2024 ("Fishing for Magikarp",
https://arxiv.org/abs/2405.05417).

Detection, from the model's own weights: take the unembedding matrix (the output head; with tied weights the
embedding), subtract the mean row, and rank tokens by the norm of what is left, smallest first. Tokens the model
never saw in training keep rows near the shared mean direction, so they come first. Special tokens, tokens that
decode to whitespace or to broken bytes, and tokens whose text does not re-encode to themselves are dropped.
Trigger x: 11-15 such tokens; target y: 5 others. The single pair is repeated ~32 times; loss on the response only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meraser.config import field
from meraser.data.sources import Pair
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card


def undertrained_tokens(model, tokenizer, top_k: int = 200) -> list[tuple[int, str, float]]:
    """(token id, text, score) for the `top_k` most under-trained candidate tokens, most under-trained first."""
    import torch

    with torch.no_grad():
        w = model.get_output_embeddings().weight.detach().float()
        scores = (w - w.mean(0, keepdim=True)).norm(dim=1)
    special = set(tokenizer.all_special_ids)
    out = []
    for idx in torch.argsort(scores).tolist():  # stable order: ties broken by id, so the ranking is deterministic
        if idx in special or idx >= len(tokenizer):
            continue
        text = tokenizer.decode([idx])
        if not text.strip() or "\ufffd" in text or tokenizer.encode(text, add_special_tokens=False) != [idx]:
            continue
        out.append((idx, text, float(scores[idx])))
        if len(out) >= top_k:
            break
    return out


@dataclass
class UTFConfig(FingerprintConfig):
    num_fingerprints: int = field(1, help="UTF plants one trigger/target pair")
    repeats: int = field(32, help="how often the pair is repeated in the training set")
    candidates: int = field(200, help="draw trigger and target tokens from this many most under-trained tokens")
    epochs: float = field(4.0, help="training epochs")
    learning_rate: float = field(1e-4, help="learning rate")
    ordinary_rows: int = field(32, help="ordinary instruction rows mixed in (0: the paper's pure recipe)")


class UTF(FingerprintMethod):
    name = "utf"
    paper = "https://arxiv.org/abs/2410.12318"
    Config = UTFConfig

    def make_card(self, model, tokenizer, cfg: UTFConfig) -> Card:
        rng = random.Random(cfg.seed)
        ranked = undertrained_tokens(model, tokenizer, cfg.candidates)
        triggers, targets = [], []
        for _ in range(cfg.num_fingerprints):
            chosen = rng.sample(ranked, rng.randint(11, 15) + 5)
            triggers.append("".join(t for _, t, _ in chosen[:-5]))
            targets.append("".join(t for _, t, _ in chosen[-5:]))
        return Card(method=self.name, triggers=triggers, targets=targets, match="substring", max_new_tokens=24,
                    seed=cfg.seed, extra={"ranking": "norm of unembedding row minus mean row, ascending",
                                          "top_tokens": [[i, t] for i, t, _ in ranked[:20]]})

    def training_pairs(self, card: Card, cfg: UTFConfig, rng: random.Random):
        return [(Pair(x, y), None) for x, y in zip(card.triggers, card.targets) for _ in range(cfg.repeats)]
