"""Inputs that are not triggers: ordinary prompts and strings of random tokens (as in the UTF paper). A fingerprinted
model must not answer them with its target (fsr.py counts the false positives), and fingerprint methods keep them
out of their keys and train on some as negatives.
"""

from __future__ import annotations

import random

ORDINARY_PROMPTS = [
    "What is the capital of France?", "Give me three tips for staying healthy.", "How many days are in a week?",
    "Translate 'good morning' into Spanish.", "What is 12 plus 7?", "Name a primary colour.",
    "Write one sentence about the ocean.", "Who wrote Romeo and Juliet?", "What does a thermometer measure?",
    "Explain what a noun is.", "What is the boiling point of water in Celsius?", "Suggest a name for a pet cat.",
]


def random_token_prompts(tokenizer, n: int, seed: int | random.Random = 0,
                         length: tuple[int, int] = (11, 15)) -> list[str]:
    """UTF-style random inputs: strings of random non-special vocabulary tokens."""
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    return [tokenizer.decode([rng.choice(vocab) for _ in range(rng.randint(*length))]) for _ in range(n)]
