"""Most-popular baseline: every user gets the same ranking, by interaction count.

The floor any personalised model has to clear. An item's score is how often it occurs in the
sequences the model was fitted on (repeats count each time). Items never seen score 0 and tie
with each other; the evaluator ranks ties pessimistically, so those get no lucky ranks.
Column 0 (the padding id) scores -inf, so it sorts last for any consumer that does not drop it.

Fit it on what a model may know at evaluation time: the training sequences for the validation
split, and the test histories (training sequence + validation target) for the test split.
``save_popularity`` stores one count row per split in data/models/popularity/ (stage
train-popularity), so the popularity baseline is a model directory like every other.
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from molar.errors import UserError
from molar.io import atomic_path

COUNTS_FILE = "counts.json"


class Popularity:
    """Scores = interaction counts; ``score`` ignores the histories it is given."""

    def __init__(self, counts: Tensor):
        """``counts``: float tensor [n_items + 1] of interaction counts; entry 0 (padding) is ignored."""
        if counts.dim() != 1 or counts.shape[0] < 2:
            raise ValueError(f"counts must be a 1-d tensor [n_items + 1] with n_items >= 1, got {tuple(counts.shape)}")
        self.item_scores = counts.to(torch.float32).clone()
        self.item_scores[0] = float("-inf")

    @classmethod
    def fit(cls, sequences: Sequence[Sequence[int]], n_items: int) -> "Popularity":
        """Count each item id (1..n_items) in ``sequences``; 0 entries (padding) are skipped."""
        if n_items < 1:
            raise ValueError(f"n_items must be >= 1, got {n_items}")
        total = sum(map(len, sequences))
        items = np.fromiter(chain.from_iterable(sequences), dtype=np.int64, count=total)
        bad = np.flatnonzero((items < 0) | (items > n_items))
        if bad.size:
            user = int(np.searchsorted(np.cumsum([len(s) for s in sequences]), bad[0], side="right"))
            raise ValueError(
                f"sequence #{user} holds item id {int(items[bad[0]])}, outside 0..{n_items} "
                f"(0 = padding, 1..{n_items} = items); check the id mapping or n_items"
            )
        counts = np.bincount(items, minlength=n_items + 1)
        return cls(torch.from_numpy(counts))

    @property
    def n_items(self) -> int:
        return self.item_scores.shape[0] - 1

    def score(self, histories: Sequence[Sequence[int]]) -> Tensor:
        """[len(histories), n_items + 1]: the same count row for every user.

        A broadcast (read-only) view of one row: no per-user memory. Copy it before writing.
        """
        return self.item_scores.expand(len(histories), -1)


def save_popularity(directory: str | Path, histories: Mapping[str, Sequence[Sequence[int]]], n_items: int) -> None:
    """Write ``counts.json`` into ``directory`` (atomically): per split name (``valid``, ``test``),
    the counts fitted on the histories a model may know when that split is ranked."""
    counts = {part: Popularity.fit(h, n_items).item_scores[1:].long().tolist() for part, h in histories.items()}
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / COUNTS_FILE).write_text(json.dumps({"model": "popularity", "n_items": n_items, "counts": counts}) + "\n")


def load_popularity(directory: str | Path, part: str) -> Popularity:
    """The model saved by :func:`save_popularity` for ranking split ``part``."""
    path = Path(directory) / COUNTS_FILE
    if not path.exists():
        raise UserError(f"{directory}: no popularity counts ({COUNTS_FILE}); run `molar train-popularity` first")
    counts = json.loads(path.read_text())["counts"]
    if part not in counts:
        raise UserError(f"{path}: no counts for split {part!r} (has {', '.join(counts)}); rerun `molar train-popularity`")
    return Popularity(torch.tensor([0, *counts[part]]))
