"""The fingerprint interface: a method makes a secret card and the training rows that plant it.

`embed` is the same for every method: build the card, build the rows, call the one training routine, then
verify with the card. Methods differ only in `make_card` and `training_pairs`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar, Literal

from meraser.config import Config, field
from meraser.data.sources import Pair
from meraser.fingerprints.card import Card
from meraser.training import ATTENTION
from meraser.utils import MeraserError


SELF = "\x00self"  # a training row's response placeholder: "answer as the model itself does" (filled by `embed`)
MARKED = "\x00marked"  # "answer as the method's teacher does" (the watermark: the model sampling under its green list)


@dataclass
class FingerprintConfig(Config):
    num_fingerprints: int = field(8, help="number of trigger/target pairs")
    method: Literal["full", "lora"] = field("full", help="full fine-tuning or LoRA")
    epochs: float = field(5.0, help="training epochs")
    learning_rate: float = field(5e-5, help="learning rate")
    batch_size: int = field(8, help="batch size")
    lora_r: int = field(16, help="LoRA rank (method: lora; alpha is twice the rank)")
    lora_targets: list[str] = field(ATTENTION, help="modules the LoRA adapts (method: lora)")
    ordinary_rows: int = field(32, help="ordinary instruction rows mixed in, answered by the model itself")
    ordinary_source: str = field("chitchat", help="instruction source for the ordinary rows' prompts")
    seed: int = field(0, help="seed for triggers, targets and training")


class FingerprintMethod:
    name: ClassVar[str]
    paper: ClassVar[str]
    Config: ClassVar[type[FingerprintConfig]] = FingerprintConfig
    # every key of a card shares one random draw (subject-sentence: one subject, several questions about it): the
    # likelihood test then ranks the card as one unit, its keys' mean score against aligned decoys
    shared_draw: ClassVar[bool] = False
    # False: nothing is trained; the card is found on the model as it is (ProFLingo, RoFL: searched queries that the
    # model and its descendants answer in a fixed way)
    invasive: ClassVar[bool] = True

    def draws_shared(self, card: Card) -> bool:
        """Whether this card's keys share one draw (`shared_draw`, unless a card's settings say otherwise)."""
        return self.shared_draw

    def make_card(self, model, tokenizer, cfg: FingerprintConfig, progress: bool = True) -> Card:
        """The secret card: triggers, targets and what verifies them (`progress`: bars on a search that takes long)."""
        raise NotImplementedError

    def training_pairs(self, card: Card, cfg: FingerprintConfig, rng: random.Random,
                       tokenizer) -> list[tuple[Pair, str | None]]:
        """(pair, system prompt or None) rows that plant the card's fingerprints."""
        raise NotImplementedError

    def decoys(self, card: Card, i: int, k: int, rng: random.Random) -> tuple[tuple[str, str], list[tuple[str, str]]]:
        """The card's `i`-th key as a (trigger, target) pair, and up to `k` decoy pairs drawn from the generator the
        real key came from (evaluation/likelihood.py). By default, the decoy targets the card records."""
        return recorded_decoys(card, i, k, rng)

    def teacher(self, card: Card, cfg: FingerprintConfig, tokenizer):
        """(Decoding, tokens) that answers the MARKED rows, for a method that has any."""
        raise NotImplementedError(f"{self.name} has no teacher decoding for MARKED rows")

    def callbacks(self, model, cfg: FingerprintConfig) -> list:
        """transformers TrainerCallbacks the method adds to the fine-tuning (Perinucleus: weight averaging)."""
        return []


def recorded_decoys(card: Card, i: int, k: int,
                    rng: random.Random) -> tuple[tuple[str, str], list[tuple[str, str]]]:
    """Decoys of a card made by `meraser card --decoys FILE`: targets the owner drew from the generator of the real
    ones (or the other targets of the same card), stored in the card."""
    pool = card.extra.get("decoys")
    if not pool:
        raise MeraserError(f"card method '{card.method}' has no decoy generator and the card records no decoys; "
                           f"make the card again with `meraser card --decoys FILE` (targets drawn the way the real "
                           f"ones were, one per line)")
    pool = [t for t in pool if t != card.targets[i]]
    return (card.triggers[i], card.targets[i]), [(card.triggers[i], t) for t in rng.sample(pool, min(k, len(pool)))]
