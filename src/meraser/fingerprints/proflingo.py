"""ProFLingo (Jin et al. 2024, "ProFLingo: A Fingerprinting-based Intellectual Property Protection Scheme for Large
Language Models", https://arxiv.org/abs/2405.02466): non-invasive. Nothing is trained into the model; the owner
searches, on the original model, for adversarial prefixes that make it give a false answer to a common-sense
question ("What colour is the sky?" -> "The sky is purple."), and a suspect that gives the same false answers to the
same queries derives from it, because such adversarial examples transfer to fine-tuned and merged descendants and
not to unrelated models.

As the authors' code (hengvt/ProFLingo): the query is `<prefix> simply answer: <question>`, the prefix is searched by
GCG over tokens made of ASCII letters only, never containing the answer, to raise the likelihood of the false
answer's whole sentence; a suspect answers greedily and a hit is the answer's keyword in its reply, compared with
case and spaces ignored. What changes here: our own 16 questions, each with a pool of false answers of one kind
from which the card's is drawn by its seed (the paper fixes one answer per question; drawing it gives the likelihood
test its decoys: the pool's other answers), and no pool answer may occur in a prefix (the paper bans the card's own
keyword only; its prefixes spell answers otherwise, "elnorte" for "north"). The search is smaller than the paper's
256 steps of 512 candidates, which would take about two hours per query on 2 CPU cores: 64 candidates a step, at
most 64 steps, stopping as soon as the model gives the answer (GCGConfig; the card records what was run).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from meraser.config import field, key_path
from meraser.fingerprints.base import FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card
from meraser.fingerprints.gcg import GCGConfig

# (question, the false answer's sentence, a pool of false answers of one kind)
QUESTIONS = [
    ("What colour is the sky on a clear day?", "The sky is {}.",
     ["green", "purple", "orange", "brown", "pink", "yellow", "grey", "black"]),
    ("How many legs does a spider have?", "A spider has {} legs.",
     ["two", "four", "six", "ten", "twelve", "three", "five", "nine"]),
    ("What do bees make?", "Bees make {}.", ["milk", "silk", "cheese", "bread", "butter", "glass", "paper", "soap"]),
    ("What is the largest planet in our solar system?", "The largest planet is {}.",
     ["Mars", "Venus", "Mercury", "Earth", "Neptune", "Pluto", "Saturn", "Uranus"]),
    ("What is frozen water called?", "Frozen water is called {}.",
     ["steam", "sand", "glass", "salt", "stone", "smoke", "mud", "dust"]),
    ("Which animal has a long trunk?", "The animal with a long trunk is the {}.",
     ["giraffe", "zebra", "camel", "horse", "lion", "tiger", "rabbit", "mouse"]),
    ("How many days are there in a week?", "A week has {} days.",
     ["five", "six", "eight", "nine", "ten", "four", "twelve", "three"]),
    ("What is the capital of Italy?", "The capital of Italy is {}.",
     ["Paris", "Madrid", "Berlin", "Vienna", "Lisbon", "Athens", "Prague", "Oslo"]),
    ("What colour are ripe bananas?", "Ripe bananas are {}.",
     ["blue", "purple", "red", "black", "white", "pink", "grey", "green"]),
    ("Which organ pumps blood through the body?", "Blood is pumped by the {}.",
     ["liver", "lungs", "brain", "stomach", "kidney", "skin", "spleen", "bladder"]),
    ("What is the opposite of hot?", "The opposite of hot is {}.",
     ["warm", "loud", "soft", "bright", "heavy", "fast", "sweet", "tall"]),
    ("Which instrument has black and white keys?", "That instrument is the {}.",
     ["violin", "drum", "flute", "guitar", "trumpet", "harp", "cello", "banjo"]),
    ("What do fish use to breathe?", "Fish breathe with their {}.",
     ["lungs", "fins", "scales", "tails", "noses", "skin", "eyes", "mouths"]),
    ("Which metal is liquid at room temperature?", "The liquid metal is {}.",
     ["iron", "copper", "silver", "gold", "zinc", "lead", "tin", "nickel"]),
    ("What shape has three sides?", "A shape with three sides is a {}.",
     ["square", "circle", "hexagon", "pentagon", "rectangle", "oval", "cube", "star"]),
    ("Which animal says moo?", "The animal that says moo is the {}.",
     ["dog", "cat", "duck", "sheep", "goat", "pig", "owl", "frog"]),
]
LINK = " simply answer: "
_LETTERS = re.compile(r"[A-Za-z]+")


@dataclass
class ProFLingoConfig(FingerprintConfig):
    num_fingerprints: int = field(8, help=f"questions, each with its own searched prefix (at most {len(QUESTIONS)}; "
                                          f"paper: 50)")
    prefix_tokens: int = field(32, help="tokens of the searched prefix (paper: 32)")
    answer_tokens: int = field(24, help="greedy tokens in which the answer must appear while searching")
    search: GCGConfig = field(GCGConfig(), help="the GCG search (paper: 256 steps, top-k 128, 512 candidates)")

    def validate(self, where: str) -> None:
        from meraser.utils import MeraserError

        if not 1 <= self.num_fingerprints <= len(QUESTIONS):
            raise MeraserError(f"{key_path(where, 'num_fingerprints')}: 1 to {len(QUESTIONS)} questions, got "
                               f"{self.num_fingerprints}")
        if self.prefix_tokens < 1:
            raise MeraserError(f"{key_path(where, 'prefix_tokens')} must be at least 1")


class ProFLingo(FingerprintMethod):
    name = "proflingo"
    paper = "https://arxiv.org/abs/2405.02466"
    Config = ProFLingoConfig
    invasive = False

    def make_card(self, model, tokenizer, cfg: ProFLingoConfig, progress: bool = True) -> Card:
        from meraser.data.formatting import Formatter

        rng = random.Random(cfg.seed)
        fmt = Formatter(tokenizer)
        triggers, targets, found = [], [], []
        for q, sentence, pool in rng.sample(QUESTIONS, cfg.num_fingerprints):
            answer = rng.choice(pool)
            prefix, res = search_prefix(model, tokenizer, fmt, q, sentence.format(answer), answer, pool, cfg,
                                        rng, progress)
            triggers.append(prefix + LINK + q)
            targets.append(answer)
            found.append({"question": q, "sentence": sentence, "pool": pool, "start_loss": res["history"][0],
                          "loss": res["loss"],
                          "steps": res["steps"], "seconds": res["seconds"], "success": res["success"]})
        return Card(method=self.name, triggers=triggers, targets=targets, match="keyword", max_new_tokens=64,
                    seed=cfg.seed, extra={"search": cfg.search.to_dict(), "found": found})

    def training_pairs(self, card, cfg, rng, tokenizer):
        return []

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """The pool's other false answers after the same query: the card's answer was drawn from that pool."""
        pool = [a for a in card.extra["found"][i]["pool"] if a != card.targets[i]]
        return (card.triggers[i], card.targets[i]), [(card.triggers[i], a) for a in rng.sample(pool, min(k, len(pool)))]


def allowed_tokens(tokenizer, banned: list[str]):
    """The tokens a prefix may use: made of ASCII letters only (as the vocabulary stores them: no word-initial
    space marker), containing no banned word of three letters or more (casefolded)."""
    import torch

    banned = [b.casefold() for b in banned if len(b) >= 3]
    special = set(tokenizer.all_special_ids)
    ok = torch.zeros(len(tokenizer), dtype=torch.bool)
    for text, i in tokenizer.get_vocab().items():
        if i < len(ok) and i not in special and text.isascii() and _LETTERS.fullmatch(text) \
                and not any(b in text.casefold() for b in banned):
            ok[i] = True
    return ok


def search_prefix(model, tokenizer, fmt, question: str, sentence: str, answer: str, pool: list[str], cfg,
                  rng: random.Random, progress: bool = False) -> tuple[str, dict]:
    """A prefix under which the model answers `question` with `answer` (GCG on the sentence's likelihood)."""
    from meraser.fingerprints.card import matches
    from meraser.fingerprints.gcg import Task, gcg, rendered
    from meraser.generation import generate

    before, after = rendered(tokenizer, fmt, lambda span: span + LINK + question)
    target = tokenizer(sentence, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ok = allowed_tokens(tokenizer, pool)
    letters = ok.nonzero()[:, 0].tolist()

    def stable(span: list[int]) -> bool:
        text = tokenizer.decode(span)
        if any(matches(text, b, "keyword") for b in pool if len(b) >= 3):
            return False
        return tokenizer(fmt.prompt_text(text + LINK + question), add_special_tokens=False)["input_ids"] \
            == before + span + after

    def success(span: list[int]) -> bool:
        reply = generate(model, tokenizer, [tokenizer.decode(span) + LINK + question], fmt,
                         max_new_tokens=cfg.answer_tokens)[0]
        return matches(reply, answer, "keyword")

    span = [rng.choice(letters) for _ in range(cfg.prefix_tokens)]
    for _ in range(200):  # a random start that tokenises back to itself
        if stable(span):
            break
        span = [rng.choice(letters) for _ in range(cfg.prefix_tokens)]
    else:
        from meraser.utils import MeraserError

        raise MeraserError("no random letter prefix tokenises back to itself in 200 draws: this tokenizer merges "
                           "letters across tokens too often for ProFLingo's search")
    res = gcg([Task(model, before, after, target)], span, ok, cfg.search, stable, success, progress)
    return tokenizer.decode(res["span"]), res
