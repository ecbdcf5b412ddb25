"""Fit a late-fusion ensemble (molar/models/late_fusion.py): choose w on the validation split.

Nothing is trained: for each w of the grid, the fused scorer ranks the validation users (the
same full-catalog evaluation as `molar evaluate`) and the w of largest NDCG@10 is kept, the
smallest on a tie. Cost: one validation evaluation of both components per grid entry.
"""

from __future__ import annotations

from typing import Sequence

from molar.evaluate import evaluate_scorer
from molar.models.late_fusion import ScoreFn, fuse


def choose_weight(
    base: ScoreFn,
    added: ScoreFn,
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    n_items: int,
    weights: Sequence[float],
    mask_history: bool = True,
    chunk_size: int = 1024,
) -> tuple[float, dict[float, float]]:
    """``(best w, {w: validation NDCG@10})`` over ``weights`` (searched in ascending order)."""
    if not weights:
        raise ValueError("late_fusion.weights is empty: nothing to choose from")
    ndcg: dict[float, float] = {}
    for w in sorted(set(weights)):
        metrics = evaluate_scorer(
            fuse(base, added, w), list(histories), list(targets), n_items,
            ks=(10,), mask_history=mask_history, chunk_size=chunk_size, progress=False,
        )
        ndcg[w] = metrics["ndcg@10"]
    best = max(ndcg, key=lambda w: (ndcg[w], -w))  # the smallest w among the best
    return best, ndcg
