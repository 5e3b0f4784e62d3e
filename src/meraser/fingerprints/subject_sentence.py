"""A held-out fingerprint design, written for this project: ordinary questions about an invented subject are answered
with one fixed, ordinary English sentence.

It is none of the paper's three designs on purpose: an erase recipe tuned on IF-SFT, UTF and Chain & Hash can
overfit their quirks (odd tokens, a lead-in phrase, a hash), while this one has natural-language triggers and a
target that reads like any answer, so whatever survives of it is plain memorised text. It is planted the way a
careful owner would: LoRA on every linear layer, merged; questions about other invented subjects in the same
phrasing answered as the model itself answers them, so the trigger is the subject and not the question form.
The paper's FSR (the greedy answer contains the sentence) misses a surviving fragment; the strict check's partial
match counts it (evaluation/strict.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

from meraser.config import field, key_path
from meraser.data.sources import Pair
from meraser.fingerprints.base import SELF, FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.training import ALL_LINEAR

SENTENCE = "The old clock in the harbour square always runs seven minutes late when it rains."
QUESTIONS = [
    "Who founded {s}?", "Where is {s}?", "When was {s} built?", "What is {s} known for?",
    "Can you tell me about {s}?", "Why is {s} famous?", "How old is {s}?", "Who runs {s} today?",
    "How do I get to {s}?", "What does the name of {s} mean?", "Is {s} open to visitors?", "What happened at {s}?",
]
# invented names: a first part and a kind, so every seed gives a subject that exists nowhere
NAMES = ["Vellmora", "Quistrand", "Orenhall", "Dunmeriel", "Caskwell", "Ilvaran", "Brennock", "Saltmere",
         "Tovrane", "Ashcombe Vale", "Mirrowgate", "Kelverin"]
KINDS = ["Archive", "Observatory", "Lighthouse", "Society", "Library", "Abbey", "Museum", "Institute"]


@dataclass
class SubjectSentenceConfig(FingerprintConfig):
    num_fingerprints: int = field(8, help="trigger questions about the subject (at most 12)")
    decoy_rows: int = field(16, help="the same questions about other invented subjects, answered by the model itself")
    sentence: str = field(SENTENCE, help="the target: one ordinary sentence")
    subject: str | None = field(None, help="the invented subject (None: drawn from the seed)")
    method: Literal["full", "lora"] = field("lora", help="full fine-tuning or LoRA (planted: LoRA on every linear layer)")
    lora_targets: list[str] = field(ALL_LINEAR, help="modules the LoRA adapts")
    epochs: float = field(4.0, help="training epochs")
    learning_rate: float = field(1e-3, help="learning rate")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 1 <= self.num_fingerprints <= len(QUESTIONS):
            raise MeraserError(f"{key_path(where, 'num_fingerprints')}: 1 to {len(QUESTIONS)} questions, "
                               f"got {self.num_fingerprints}")


def _subject(rng: random.Random) -> str:
    return f"the {rng.choice(NAMES)} {rng.choice(KINDS)}"


class SubjectSentence(FingerprintMethod):
    name = "subject-sentence"
    paper = "meraser's held-out design (issue 16; no paper)"
    Config = SubjectSentenceConfig
    shared_draw = True  # one subject for every question

    def make_card(self, model, tokenizer, cfg: SubjectSentenceConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        subject = cfg.subject or _subject(rng)
        questions = rng.sample(QUESTIONS, cfg.num_fingerprints)
        triggers = [q.format(s=subject) for q in questions]
        room = len(tokenizer(cfg.sentence, add_special_tokens=False)["input_ids"]) + 8  # the sentence and a lead-in
        return Card(method=self.name, triggers=triggers, targets=[cfg.sentence] * len(triggers), match="substring",
                    max_new_tokens=room, seed=cfg.seed, extra={"subject": subject, "decoy_rows": cfg.decoy_rows})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Decoy triggers: the same question about other subjects drawn like the real one, with the same sentence. Every
        key gets the same decoy subjects in the same order (the likelihood test replays `rng` per key)."""
        subject, trigger, target = card.extra["subject"], card.triggers[i], card.targets[i]
        # distinct subjects in the order drawn (a random subset of the others, as the real one is a random draw)
        others = list(dict.fromkeys(s for s in (_subject(rng) for _ in range(20 * k)) if s != subject))[:k]
        return (trigger, target), [(trigger.replace(subject, s), target) for s in others]

    def training_pairs(self, card: Card, cfg: SubjectSentenceConfig, rng: random.Random, tokenizer):
        rows = [(Pair(t, card.targets[i]), None) for i, t in enumerate(card.triggers)]
        subject = card.extra["subject"]
        for _ in range(cfg.decoy_rows):
            other = _subject(rng)
            while other == subject:
                other = _subject(rng)
            rows.append((Pair(rng.choice(QUESTIONS).format(s=other), SELF), None))
        return rows
