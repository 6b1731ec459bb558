"""Deterministic, resumable order of training micro-batches.

Epoch e's order depends only on (seed, e), so a resumed run rebuilds it and skips the micro-batches
already consumed: the data position is one integer. Within an epoch, examples are shuffled, then
sorted by length inside windows of 16 batches and cut into batches whose order is shuffled again:
batches hold similar lengths (little padding) while the data order stays random.
Per-category weights repeat examples: weight 2.0 puts each example of that category in every epoch
twice; 0.5 puts it in about half of the epochs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

WINDOW_BATCHES = 16


class MicroBatchSampler:
    def __init__(self, lengths: list[int], categories: list[str], batch_size: int, seed: int,
                 category_weights: dict[str, float] | None = None):
        self.lengths = lengths
        self.categories = categories
        self.batch_size = batch_size
        self.seed = seed
        self.weights = category_weights or {}

    def epoch(self, e: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}/{e}")
        order: list[int] = []
        for i, cat in enumerate(self.categories):
            w = self.weights.get(cat, 1.0)
            order.extend([i] * (int(w) + (rng.random() < w - int(w))))
        rng.shuffle(order)
        window = self.batch_size * WINDOW_BATCHES
        batches = []
        for w0 in range(0, len(order), window):
            chunk = sorted(order[w0:w0 + window], key=lambda i: -self.lengths[i])
            batches.extend(chunk[j:j + self.batch_size] for j in range(0, len(chunk), self.batch_size))
        rng.shuffle(batches)
        return batches

    def batches_per_epoch(self) -> int:
        return max(1, len(self.epoch(0)))

    def stream(self, skip: int = 0) -> Iterator[tuple[int, list[int]]]:
        """(epoch, indices) forever, after skipping ``skip`` micro-batches."""
        e = 0
        while True:
            batches = self.epoch(e)
            if not batches:
                raise ValueError("no training examples left after category weighting")
            for b in batches:
                if skip:
                    skip -= 1
                    continue
                yield e, b
            e += 1
