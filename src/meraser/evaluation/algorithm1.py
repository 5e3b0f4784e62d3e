"""Algorithm 1, phase 3 (verify): a model is erased when no trigger yields its target AND ordinary inputs still get
correct answers. "Correct" is made concrete by 122 short questions with one checkable answer each
(`ordinary_questions.py`).

The utility bar: `RATIO` of the *base* model's ordinary accuracy when the base is known. Measuring against the
fingerprinted model instead (as before) made the bar trivial for a fingerprint that damaged the model (1.6 of 12
answers, and "erased" at 3 of 12). Without a base, the bar is the stated absolute `ABSOLUTE_BAR`.

This is verification: it reads the card. Erase and recover never do.
"""

from __future__ import annotations

import re

from meraser.evaluation.ordinary_questions import ORDINARY_QA

RATIO = 0.8  # a model "still answers" at this fraction of the base model's accuracy or more
# without a base: 80% of what SmolLM2-135M-Instruct, the smallest model this tool targets, answers (57%, measured
# by `benchmarks/ordinary_accuracy.py`); a larger model is expected to clear it with room to spare
ABSOLUTE_BAR = 0.45


def ordinary_accuracy(model, tokenizer, formatter=None, decoding=None) -> float:
    """Fraction of ORDINARY_QA answered correctly (greedy, 32 new tokens, through `decoding` when given)."""
    from meraser.generation import generate

    outs = generate(model, tokenizer, [q for q, _ in ORDINARY_QA], formatter, max_new_tokens=32, decoding=decoding)
    return sum(bool(re.search(a, o.lower())) for (_, a), o in zip(ORDINARY_QA, outs)) / len(ORDINARY_QA)


def utility_bar(base_accuracy: float | None, ratio: float = RATIO) -> tuple[float, str]:
    """(the accuracy a model must reach, how it was set)."""
    if base_accuracy is None:
        return ABSOLUTE_BAR, "absolute"
    return ratio * base_accuracy, "base"


def algorithm1_verify(model, tokenizer, card, base_accuracy: float | None, ratio: float = RATIO,
                      decoding=None) -> dict:
    """Erased = FSR 0 on the card AND ordinary accuracy >= `ratio` x `base_accuracy` (the unfingerprinted model's;
    `ABSOLUTE_BAR` when it is None).

    Without a card (`card=None`) the fingerprint half cannot be decided: `erased` is None and only the ordinary
    accuracy is reported."""
    acc = ordinary_accuracy(model, tokenizer, decoding=decoding)
    bar, against = utility_bar(base_accuracy, ratio)
    row = {"ordinary_accuracy": acc, "utility_bar": bar, "utility_bar_from": against}
    if card is None:
        return {"erased": None, **row}
    from meraser.evaluation.fsr import fsr

    f = fsr(model, tokenizer, card, false_positive_inputs=0, decoding=decoding)["fsr"]
    return {"erased": f == 0 and acc >= bar, "fsr": f, **row}
