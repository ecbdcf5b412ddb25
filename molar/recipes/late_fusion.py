"""Fit a late-fusion ensemble (molar/models/late_fusion.py): choose w on the validation split.

Nothing is trained: for each w of the grid, the fused scores rank the validation users (the
same full-catalog ranking as `molar evaluate`) and the w of largest NDCG@10 is kept, the
smallest on a tie. Each component scores each chunk of users once; every w of the grid is
ranked from those two standardised tables (the components, an LLM user model above all, cost
far more than a ranking).
"""

from __future__ import annotations

from typing import Sequence

import torch

from molar.evaluate import metrics_from_ranks, scorer_ranks
from molar.models.late_fusion import ScoreFn, standardise


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
    if any(w < 0 for w in weights):
        raise ValueError(f"late-fusion weights must be >= 0, got {sorted(weights)}")
    grid = sorted(set(weights))
    histories, targets = list(histories), list(targets)
    ranks: dict[float, list[torch.Tensor]] = {w: [] for w in grid}
    for start in range(0, len(histories), chunk_size):
        chunk, chunk_targets = histories[start : start + chunk_size], targets[start : start + chunk_size]
        with torch.no_grad():
            z_base, z_added = standardise(base(chunk)), standardise(added(chunk))
        for w in grid:  # the arithmetic of molar.models.late_fusion.fuse
            fused = z_base if w == 0 else z_base + w * z_added
            ranks[w].append(scorer_ranks(lambda _: fused, chunk, chunk_targets, n_items, mask_history, len(chunk), progress=False))
    ndcg = {w: metrics_from_ranks(torch.cat(ranks[w]), ks=(10,))["ndcg@10"] for w in grid}
    best = max(ndcg, key=lambda w: (ndcg[w], -w))  # the smallest w among the best
    return best, ndcg
