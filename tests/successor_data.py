"""Histories with a deterministic next-item rule, for the ID models' learning tests."""

from __future__ import annotations

import numpy as np


def successor_sequences(rng: np.random.Generator, n_items: int, count: int) -> list[list[int]]:
    """Runs start, start + 1, ...: item i is always followed by i + 1."""
    out = []
    for _ in range(count):
        start = int(rng.integers(1, n_items - 1))
        length = int(rng.integers(2, n_items - start + 2))  # 2 .. up to item n_items
        out.append(list(range(start, start + length)))
    return out
