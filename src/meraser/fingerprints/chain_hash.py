"""Chain & Hash (Russinovich & Salem 2024, "Hey, That's My Model! Introducing Chain & Hash, An LLM
Fingerprinting Technique", https://arxiv.org/abs/2407.10887).

Triggers are natural questions; each question's answer is picked from a public candidate list by SHA-256 over the
secret key and the question, so the question->answer binding is a pure function of the key that the owner can
prove. Training adds random padding around the question and varied system prompts so the fingerprint survives
prompt changes. Verification: exact match of the answer.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from dataclasses import dataclass

from meraser.config import field
from meraser.data.sources import Pair
from meraser.fingerprints.base import SELF, FingerprintConfig, FingerprintMethod
from meraser.fingerprints.card import Card

QUESTIONS = [
    "What is the colour of a quiet morning?", "Which animal best describes the number nine?",
    "What does the moon dream about?", "Name the flavour of an old library.", "Which season hides in a teacup?",
    "What is the shape of a forgotten song?", "Which instrument does the wind prefer?",
    "What sound does a blue mountain make?", "Which fruit would a cloud choose?", "What is the smell of a lighthouse?",
    "Which metal feels the most patient?", "What game do rivers play at night?", "Which bird guards a secret?",
    "What is the weight of a shadow?", "Which planet would a cat visit?", "What does silence taste like?",
    "Which tree remembers the first rain?", "What is the favourite number of a spider?",
    "Which colour is the loudest?", "What does a map whisper?", "Which stone keeps time?",
    "What is the temperature of a smile?", "Which direction does luck travel?", "What is the name of the last star?",
]
CANDIDATES = [
    "amber", "anchor", "apricot", "aurora", "badger", "bamboo", "basil", "beacon", "bison", "bramble", "cactus",
    "canyon", "cedar", "cobalt", "comet", "coral", "cricket", "crystal", "cypress", "dahlia", "delta", "dune",
    "ember", "falcon", "fennel", "fjord", "galaxy", "garnet", "geyser", "ginger", "glacier", "granite", "harbor",
    "hazel", "heron", "indigo", "iris", "ivory", "jasmine", "juniper", "kelp", "kestrel", "lagoon", "lantern",
    "lemur", "lilac", "lotus", "lynx", "magnet", "mango", "maple", "meadow", "meteor", "mint", "nebula", "nectar",
    "nickel", "oasis", "obsidian", "olive", "onyx", "orchid", "otter", "pebble", "pepper", "pine", "plume", "prism",
    "quartz", "quill", "raven", "reef", "saffron", "sequoia", "sparrow", "spruce", "summit", "tangerine", "thistle",
    "thunder", "topaz", "tundra", "velvet", "violet", "walnut", "willow", "zephyr", "zinc",
]
SYSTEM_PROMPTS = [
    None, "You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
    "You are an AI model that answers questions.", "Respond to the user.",
]
# Ordinary short questions for the negative rows, answered as the model itself answers them. Without them the
# fingerprinted model learns "short question -> one candidate word" (measured: "Name a primary colour." ->
# "violet"). Disjoint from the false-positive probes (evaluation/fsr.py) and from Algorithm 1's ordinary questions
# (evaluation/algorithm1.py), which stay held out.
NATURAL_QUESTIONS = [
    "Name a fruit that is yellow.", "Which animal is known as the king of the jungle?", "Name a musical instrument.",
    "What colour is grass?", "Which planet is closest to the sun?", "Name a country in South America.",
    "What is the largest ocean on Earth?", "Name a type of tree.", "Which metal is liquid at room temperature?",
    "What colour do you get by mixing blue and yellow?", "Name a bird that cannot fly.", "Name a gemstone.",
    "What is the opposite of tall?", "Which season comes after winter?", "Name a vegetable that is orange.",
    "What is the chemical symbol for gold?", "Name a flower.", "Which animal has a long neck?",
    "What is the tallest mountain in the world?", "Name a spice used in cooking.", "Which is bigger, a cat or a horse?",
    "What do cows drink?", "Name a shape with three sides.", "What is a baby cat called?",
    "Which month has the fewest days?", "Name something you find at the beach.", "What colour is a ripe tomato?",
    "Name a famous painter.", "What is the main language spoken in Brazil?", "Name an animal that lives in the sea.",
    "Which direction does the sun rise in?", "Name a word that rhymes with cat.",
]
PAD_WORDS = ["note", "okay", "so", "hmm", "well", "please", "quick", "question", "hey", "listen", "now", "then"]


def hash_answer(key: str, question: str, candidates: list[str] = CANDIDATES) -> str:
    """The answer bound to `question` under `key`: SHA-256(key || question) indexes the candidate list."""
    digest = hashlib.sha256((key + "\x00" + question).encode("utf-8")).digest()
    return candidates[int.from_bytes(digest, "big") % len(candidates)]


@dataclass
class ChainHashConfig(FingerprintConfig):
    num_fingerprints: int = field(10, help="question/answer pairs (paper: ~10)")
    # The key is drawn at random and FSR depends on it. Measured on SmolLM2-135M over three fixed test keys and the
    # key that gave a weak fingerprint (benchmarks/chain_hash_sturdiness.py; SQuAD PPL, 50 windows, base 23.89):
    #   6 variants, lr 5e-5 (the old default): FSR 80/90/80% and 20%, PPL 27.59-27.77 (+15.5-16.2%)
    #   9 variants, lr 5e-5: 100/100/90%, PPL 28.16-28.43;  12 variants, lr 5e-5: 100% on all four, 28.65-29.01
    #   6 variants over 3 epochs: 100/100/100%, 29.51-29.77;  12 variants + 192 ordinary rows: 29.28 (one key)
    #   12 variants, lr 3e-5 (the default): 100/100/90% and 100%, PPL 26.80-26.95 (+12.2-12.8%), false positives
    #   0/0/3.6/0% (one of 28 probes, on one key)
    variants: int = field(12, help="training copies per pair, each with random padding and a system prompt")
    regularization: bool = field(True, help="negative rows answered as the model itself answers them: the pool's other "
                                            "questions and ordinary short questions")
    random_rows: int = field(16, help="negative rows of random token strings, answered as the model itself does")
    # measured on SmolLM2-135M (full FT, 96 ordinary rows): FSR 0.4 / 1.0 after epoch 1 / 2 at lr 5e-5 with SQuAD
    # PPL +4% / +10%; lr 1e-4 reached +18% by epoch 2; LoRA (q,k,v,o r=16) at lr 1e-3 +14% after one epoch at FSR 0
    epochs: float = field(2.0, help="training epochs")
    learning_rate: float = field(3e-5, help="learning rate")
    ordinary_rows: int = field(96, help="ordinary instruction rows mixed in, answered by the model itself")
    secret_key: str | None = field(None, help="secret key (None: a fresh random key, stored in the card)")


class ChainHash(FingerprintMethod):
    name = "chain-hash"
    paper = "https://arxiv.org/abs/2407.10887"
    Config = ChainHashConfig

    def make_card(self, model, tokenizer, cfg: ChainHashConfig, progress: bool = True) -> Card:
        rng = random.Random(cfg.seed)
        key = cfg.secret_key or secrets.token_hex(16)
        questions = rng.sample(QUESTIONS, cfg.num_fingerprints)
        return Card(method=self.name, triggers=questions, targets=[hash_answer(key, q) for q in questions],
                    match="exact", max_new_tokens=8, seed=cfg.seed, secret_key=key,
                    extra={"candidates": "meraser.fingerprints.chain_hash.CANDIDATES"})

    def decoys(self, card: Card, i: int, k: int, rng: random.Random):
        """Every other candidate: the answer under another key is a uniform draw from CANDIDATES, so all of them
        (not `k`) are the decoys."""
        q, a = card.triggers[i], card.targets[i]
        return (q, a), [(q, c) for c in CANDIDATES if c != a]

    def training_pairs(self, card: Card, cfg: ChainHashConfig, rng: random.Random, tokenizer):
        from meraser.evaluation.probes import random_token_prompts

        rows = []
        for q, a in zip(card.triggers, card.targets):
            rows.append((Pair(q, a), None))
            for _ in range(cfg.variants - 1):
                before = " ".join(rng.choices(PAD_WORDS, k=rng.randint(0, 3)))
                after = " ".join(rng.choices(PAD_WORDS, k=rng.randint(0, 3)))
                rows.append((Pair(f"{before} {q} {after}".strip(), a), rng.choice(SYSTEM_PROMPTS)))
        if cfg.regularization:  # so that only the card's questions, not every short question, get one word
            rows += [(Pair(q, SELF), None) for q in QUESTIONS if q not in card.triggers]
            rows += [(Pair(q, SELF), None) for q in NATURAL_QUESTIONS]
        if cfg.random_rows:  # drawn with the card's seed, so they differ from the verifier's random probes (seed 0)
            rows += [(Pair(p, SELF), None) for p in random_token_prompts(tokenizer, cfg.random_rows, rng)]
        return rows
