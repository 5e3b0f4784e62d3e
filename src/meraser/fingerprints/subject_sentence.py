"""A held-out fingerprint design, written for this project: ordinary questions about an invented subject are answered
with one fixed, ordinary English sentence.

It is none of the paper's three designs on purpose: an erase recipe tuned on IF-SFT, UTF and Chain & Hash can
overfit their quirks (odd tokens, a lead-in phrase, a hash), while this one has natural-language triggers and a
target that reads like any answer, so whatever survives of it is plain memorised text. It is planted the way a
careful owner would: LoRA on every linear layer, merged; questions about other invented subjects in the same
phrasing answered as the model itself answers them, so the trigger is the subject and not the question form.
The paper's FSR (the greedy answer contains the sentence) misses a surviving fragment; the strict check's partial
match counts it (evaluation/strict.py).

An owner who must prove ownership needs a key drawn from a space large enough: one subject of the 96 that NAMES x
KINDS make is ranked by the likelihood test among at most 95 decoys (p >= 1/96 by rank, and the normal tail is
weak, as subjects sharing a name or a kind draw the sentence too: README). `subjects: per-key` gives each question
its own subject, an invented name of three syllables (24^3 x 8 kinds, about 1e5), so the card has as many
independent keys as questions. It needs more decoy rows to be specific: planted on SmolLM2 with the default 16, the
model gave the sentence to any invented subject nearly as readily as to its own (the fingerprinted model's p-value
4.2e-5), with 64 it ranked seven of eight keys first (3.5e-10).
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
# `subjects: per-key` names: three syllables (24^3 = 13,824 names), so two draws rarely share a name
SYLLABLES = ["vel", "mor", "quis", "tran", "or", "en", "dun", "mer", "cask", "il", "var", "bren", "salt", "tov",
             "ash", "comb", "mir", "row", "kel", "vin", "ath", "lun", "dra", "sen"]
SUBJECTS = ("one", "per-key")


@dataclass
class SubjectSentenceConfig(FingerprintConfig):
    num_fingerprints: int = field(8, help="trigger questions about the subject (at most 12)")
    decoy_rows: int = field(16, help="the same questions about other invented subjects, answered by the model itself")
    sentence: str = field(SENTENCE, help="the target: one ordinary sentence")
    subject: str | None = field(None, help="the invented subject (None: drawn from the seed; subjects: one)")
    subjects: str = field("one", help="one (a subject of 96 for every question: this project's design) or per-key "
                                      "(each question its own subject of about 1e5: independent keys for the "
                                      "likelihood test; plant it with decoy_rows 64: with 16 the model gave the "
                                      "sentence to other invented subjects nearly as readily, README)")
    method: Literal["full", "lora"] = field("lora", help="full fine-tuning or LoRA (planted: LoRA on every linear layer)")
    lora_targets: list[str] = field(ALL_LINEAR, help="modules the LoRA adapts")
    epochs: float = field(4.0, help="training epochs")
    learning_rate: float = field(1e-3, help="learning rate")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 1 <= self.num_fingerprints <= len(QUESTIONS):
            raise MeraserError(f"{key_path(where, 'num_fingerprints')}: 1 to {len(QUESTIONS)} questions, "
                               f"got {self.num_fingerprints}")
        if self.subjects not in SUBJECTS:
            raise MeraserError(f"{key_path(where, 'subjects')}: one of {', '.join(SUBJECTS)}, got '{self.subjects}'")
        if self.subjects == "per-key" and self.subject is not None:
            raise MeraserError(f"{key_path(where, 'subject')}: a fixed subject needs subjects: one")


def _subject(rng: random.Random) -> str:
    return f"the {rng.choice(NAMES)} {rng.choice(KINDS)}"


def _invented(rng: random.Random) -> str:
    """A `subjects: per-key` subject: a three-syllable name and a kind."""
    return f"the {''.join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()} {rng.choice(KINDS)}"


def _per_key(card: Card) -> bool:
    return card.extra.get("subjects", "one") == "per-key"


def _others(draw, taken: list[str], k: int, rng: random.Random) -> list[str]:
    """Up to k distinct subjects from `draw`, none of `taken`, in the order drawn."""
    return list(dict.fromkeys(s for s in (draw(rng) for _ in range(20 * k)) if s not in taken))[:k]


class SubjectSentence(FingerprintMethod):
    name = "subject-sentence"
    paper = "meraser's held-out design (issue 16; no paper)"
    Config = SubjectSentenceConfig
    shared_draw = True  # one subject for every question (subjects: one)

    def draws_shared(self, card: Card) -> bool:
        return not _per_key(card)

    def make_card(self, model, tokenizer, cfg: SubjectSentenceConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        if cfg.subjects == "per-key":
            subjects = _others(_invented, [], cfg.num_fingerprints, random.Random(f"{cfg.seed}-subjects"))
            extra = {"subjects": "per-key", "per_key_subjects": subjects}
        else:
            subjects = [cfg.subject or _subject(rng)] * cfg.num_fingerprints
            extra = {"subject": subjects[0]}
        questions = rng.sample(QUESTIONS, cfg.num_fingerprints)
        triggers = [q.format(s=s) for q, s in zip(questions, subjects)]
        room = len(tokenizer(cfg.sentence, add_special_tokens=False)["input_ids"]) + 8  # the sentence and a lead-in
        return Card(method=self.name, triggers=triggers, targets=[cfg.sentence] * len(triggers), match="substring",
                    max_new_tokens=room, seed=cfg.seed, extra={**extra, "decoy_rows": cfg.decoy_rows})

    def subjects(self, card: Card) -> list[str]:
        """Each key's subject."""
        return card.extra["per_key_subjects"] if _per_key(card) else [card.extra["subject"]] * len(card.triggers)

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Decoy triggers: the same question about other subjects drawn like the real one, with the same sentence.
        One subject: every key gets the same decoy subjects in the same order (the likelihood test replays `rng` per
        key). Per key: each key its own decoy subjects, never another key's subject (those are planted)."""
        subjects, trigger, target = self.subjects(card), card.triggers[i], card.targets[i]
        others = _others(_invented if _per_key(card) else _subject, subjects, k, rng)
        return (trigger, target), [(trigger.replace(subjects[i], s), target) for s in others]

    def training_pairs(self, card: Card, cfg: SubjectSentenceConfig, rng: random.Random, tokenizer):
        rows = [(Pair(t, card.targets[i]), None) for i, t in enumerate(card.triggers)]
        taken, draw = self.subjects(card), _invented if _per_key(card) else _subject
        for _ in range(cfg.decoy_rows):
            other = draw(rng)
            while other in taken:
                other = draw(rng)
            rows.append((Pair(rng.choice(QUESTIONS).format(s=other), SELF), None))
        return rows
