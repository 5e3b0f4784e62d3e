"""Length-grouped batches with little padding.

transformers' LengthGroupedSampler sorts rows by length only inside random mega-batches of at most 50 batches and
at least 4 mega-batches per dataset, so a small set is barely grouped: on the 60 first reference mismatched rows
(SmolLM2 chat template, batch 8) it pads to 20,908 tokens where a full sort pads to 16,640; on all 300 rows,
82,496 against 76,352. Padded tokens are compute on a CPU. Here rows are sorted over the whole set, with a random
jitter of up to 16 tokens on each length so that rows of nearly equal length trade batches from epoch to epoch
(about 1.5% more padding than a strict sort), and the batches are then shuffled.
"""

from __future__ import annotations

import random

from torch.utils.data import Sampler

JITTER_TOKENS = 16


class LengthBatchedSampler(Sampler):
    """Indices whose consecutive runs of `batch_size` are rows of near-equal length.

    The order is a function of (seed, epoch) only, so a run resumed mid-epoch sees the same batches. The longest
    full batch comes first, so an out-of-memory error shows at the first step rather than hours in; when the set
    does not divide into full batches, the ragged batch holds the longest rows (fewer rows padded to the longest
    length) and comes last, where the data loader expects it.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer before each epoch
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 100_003 + self.epoch)
        key = [n + rng.uniform(0, JITTER_TOKENS) for n in self.lengths]
        order = sorted(range(len(key)), key=lambda i: -key[i])
        ragged = len(order) % self.batch_size
        ragged_rows, order = order[:ragged], order[ragged:]
        batches = [order[s:s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        rest = batches[1:]
        rng.shuffle(rest)
        return iter([i for batch in batches[:1] + rest for i in batch] + ragged_rows)
