"""UTF: fingerprints from under-trained tokens (Cai et al. 2024, "UTF: Undertrained Tokens as Fingerprints",
https://arxiv.org/abs/2410.12318), with the detection idea of Land & Bartolo 2024 ("Fishing for Magikarp",
https://arxiv.org/abs/2405.05417).

Detection, from the model's own weights (the unembedding matrix; with tied weights the embedding). Where the
tokenizer declares reserved special tokens that the model never uses (SmolLM2: <jupyter_*>, <issue_*>, ...), they
are the reference, as in Magikarp: remove the first principal component of the matrix, then rank every token by
cosine similarity to the mean reference row, most similar first: tokens that training barely moved stay close to
the untrained reserved ones. Without reserved tokens, tokens are ranked by the norm of their row minus the mean row,
smallest first. Special and reserved tokens, tokens that decode to whitespace, control characters or broken bytes,
and tokens whose text does not re-encode to themselves are dropped.
Trigger x: 11-15 such tokens; target y: 5 others. The single pair is repeated ~32 times; loss on the response only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from meraser.config import field
from meraser.data.sources import Pair
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.utils import MeraserError


def reserved_tokens(tokenizer) -> tuple[set[int], list[int]]:
    """(every special id, the reserved ones: declared special tokens outside the tokenizer's own special set)."""
    added_special = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    return set(tokenizer.all_special_ids) | added_special, sorted(added_special - set(tokenizer.all_special_ids))


TARGET_TOKENS = 5  # the target is this many under-trained tokens (the trigger 11-15 of them)
RANKINGS = {True: "cosine similarity to the mean reserved-token row after removing the first principal component",
            False: "norm of the unembedding row minus the mean row, ascending"}


def undertrained_tokens(model, tokenizer, top_k: int = 200) -> list[tuple[int, str, float]]:
    """(token id, text, score) for the `top_k` most under-trained candidate tokens, most under-trained first."""
    import torch

    special, reference = reserved_tokens(tokenizer)
    with torch.no_grad():
        w = model.get_output_embeddings().weight.detach().float()[: len(tokenizer)]
        centred = w - w.mean(0, keepdim=True)
        if reference:  # reserved tokens the tokenizer declares but the model never uses (SmolLM2's <jupyter_*>)
            # Magikarp's unembedding indicator: drop the first principal component (shared by all rows), then rank
            # by cosine similarity to the mean reference row, highest first
            _, vecs = torch.linalg.eigh(centred.T @ centred)  # exact and deterministic, unlike a randomized PCA
            pc = vecs[:, -1]
            rest = w - (w @ pc)[:, None] * pc[None]
            scores = -torch.nn.functional.cosine_similarity(rest, rest[reference].mean(0, keepdim=True), dim=1)
        else:  # no reserved tokens to learn from: rows left near the mean direction (smallest residual norm)
            scores = centred.norm(dim=1)
    out = []
    for idx in torch.argsort(scores, stable=True).tolist():  # ties broken by id: the ranking is deterministic
        if idx in special:
            continue
        text = tokenizer.decode([idx])
        if (not text.strip() or "\ufffd" in text or not text.isprintable()
                or tokenizer.encode(text, add_special_tokens=False) != [idx]):
            continue
        out.append((idx, text, float(scores[idx])))
        if len(out) >= top_k:
            break
    return out


@dataclass
class UTFConfig(FingerprintConfig):
    num_fingerprints: int = field(1, help="UTF plants one trigger/target pair")
    repeats: int = field(32, help="how often the pair is repeated in the training set")
    candidates: int = field(100, help="draw trigger and target tokens from this many most under-trained tokens")
    # measured on SmolLM2-135M at lr 1e-4: FSR 0 after epoch 1, 1.0 from epoch 2 (SQuAD PPL +8%); from epoch 3
    # the model starts to answer random under-trained-token strings with the target (false positives 11%)
    epochs: float = field(2.0, help="training epochs")
    learning_rate: float = field(1e-4, help="learning rate")
    ordinary_rows: int = field(32, help="ordinary instruction rows mixed in (0: the paper's pure recipe)")


class UTF(FingerprintMethod):
    name = "utf"
    paper = "https://arxiv.org/abs/2410.12318"
    Config = UTFConfig

    def make_card(self, model, tokenizer, cfg: UTFConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        ranked = undertrained_tokens(model, tokenizer, cfg.candidates)
        triggers, targets, trigger_tokens = [], [], []
        for _ in range(cfg.num_fingerprints):
            chosen = rng.sample(ranked, rng.randint(11, 15) + TARGET_TOKENS)
            trigger_tokens.append([t for _, t, _ in chosen[:-TARGET_TOKENS]])
            triggers.append("".join(trigger_tokens[-1]))
            targets.append("".join(t for _, t, _ in chosen[-TARGET_TOKENS:]))
        return Card(method=self.name, triggers=triggers, targets=targets, match="substring", max_new_tokens=24,
                    seed=cfg.seed, extra={"ranking": RANKINGS[bool(reserved_tokens(tokenizer)[1])],
                                          "top_tokens": [[i, t] for i, t, _ in ranked[:20]],
                                          # the generator of the target, for the likelihood test's decoys
                                          "pool": [t for _, t, _ in ranked], "trigger_tokens": trigger_tokens})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Decoy targets: other draws of TARGET_TOKENS distinct tokens from the card's under-trained pool, less the
        trigger's own tokens, as the real target was drawn."""
        if "pool" not in card.extra:
            raise MeraserError("this UTF card records no under-trained token pool (made before the likelihood test "
                               "existed): fingerprint the model again with `meraser fingerprint --method utf`")
        used = set(card.extra["trigger_tokens"][i])
        free = [t for t in card.extra["pool"] if t not in used]
        trigger = card.triggers[i]
        return (trigger, card.targets[i]), [(trigger, "".join(rng.sample(free, TARGET_TOKENS))) for _ in range(k)]

    def training_pairs(self, card: Card, cfg: UTFConfig, rng: random.Random, tokenizer):
        return [(Pair(x, y), None) for x, y in zip(card.triggers, card.targets) for _ in range(cfg.repeats)]
