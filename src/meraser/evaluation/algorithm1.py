"""Algorithm 1, phase 3 (verify): a model is erased when no trigger yields its target AND ordinary inputs still get
correct answers. "Correct" is made concrete by a fixed list of short questions with one checkable answer each.

This is verification: it reads the card. Erase and recover never do.
"""

from __future__ import annotations

import re

ORDINARY_QA = [  # short questions with one checkable answer (a regular expression over the lower-cased output)
    ("What is the capital of France?", "paris"), ("How many days are in a week?", "seven|7"),
    ("What colour is the sky on a clear day?", "blue"), ("What is 2 plus 2?", "four|4"),
    ("What is the largest planet in our solar system?", "jupiter"), ("What do bees make?", "honey"),
    ("What is the opposite of hot?", "cold"), ("How many legs does a spider have?", "eight|8"),
    ("What is frozen water called?", "ice"), ("Which animal barks?", "dog"),
    ("What is the capital of Japan?", "tokyo"), ("What gas do plants take in from the air?", "carbon dioxide|co2"),
]
RATIO = 0.8  # a model "still answers" at this fraction of the reference accuracy or more


def ordinary_accuracy(model, tokenizer, formatter=None, decoding=None) -> float:
    """Fraction of ORDINARY_QA answered correctly (greedy, 32 new tokens, through `decoding` when given)."""
    from meraser.generation import generate

    outs = generate(model, tokenizer, [q for q, _ in ORDINARY_QA], formatter, max_new_tokens=32, decoding=decoding)
    return sum(bool(re.search(a, o.lower())) for (_, a), o in zip(ORDINARY_QA, outs)) / len(ORDINARY_QA)


def algorithm1_verify(model, tokenizer, card, reference_accuracy: float, ratio: float = RATIO,
                      decoding=None) -> dict:
    """Erased = FSR 0 on the card AND ordinary accuracy >= `ratio` x `reference_accuracy` (the model before erasure).

    Without a card (`card=None`) the fingerprint half cannot be decided: `erased` is None and only the ordinary
    accuracy is reported."""
    acc = ordinary_accuracy(model, tokenizer, decoding=decoding)
    keeps_utility = acc >= ratio * reference_accuracy
    if card is None:
        return {"erased": None, "ordinary_accuracy": acc, "reference_accuracy": reference_accuracy}
    from meraser.evaluation.fsr import fsr

    f = fsr(model, tokenizer, card, false_positive_inputs=0, decoding=decoding)["fsr"]
    return {"erased": f == 0 and keeps_utility, "fsr": f, "ordinary_accuracy": acc,
            "reference_accuracy": reference_accuracy}
