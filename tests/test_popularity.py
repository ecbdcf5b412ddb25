"""Popularity baseline: counts, ranking, and use through the evaluator."""

from __future__ import annotations

import math

import pytest
import torch

from molar.evaluate import evaluate_scorer, target_ranks
from molar.models.popularity import Popularity

# Item 1 once, item 2 three times, item 3 four times, item 4 never; the 0s are padding.
SEQUENCES = [[1, 2, 2], [2, 3, 0], [3, 3, 3]]


def test_counts():
    model = Popularity.fit(SEQUENCES, n_items=4)
    assert model.n_items == 4
    assert model.item_scores.tolist() == [-math.inf, 1.0, 3.0, 4.0, 0.0]


def test_same_row_for_every_user():
    scores = Popularity.fit(SEQUENCES, n_items=4).score([[1], [], [4, 4]])
    assert scores.shape == (3, 5)
    assert torch.equal(scores[0], scores[2])


def test_ranking_by_count():
    model = Popularity.fit(SEQUENCES, n_items=4)
    histories = [[], [], [], [], [3]]
    scores = model.score(histories)
    # 3 (4 times) > 2 (3) > 1 (1) > 4 (0); with item 3 in the history, item 2 comes first.
    ranks = target_ranks(scores, torch.tensor([3, 2, 1, 4, 2]), exclude=histories)
    assert ranks.tolist() == [0, 1, 2, 3, 0]


def test_through_the_evaluator_without_touching_the_model():
    model = Popularity.fit(SEQUENCES, n_items=4)
    before = model.item_scores.clone()
    m = evaluate_scorer(model.score, [[], [3], [1]], [3, 2, 2], n_items=4, ks=(1,), chunk_size=2, progress=False)
    # User 0: item 3 first (hit); user 1: 3 masked, 2 first (hit); user 2: 3 above 2 (miss).
    assert m == {"ndcg@1": pytest.approx(2 / 3), "recall@1": pytest.approx(2 / 3)}
    assert torch.equal(model.item_scores, before)


def test_out_of_range_item_is_an_error():
    with pytest.raises(ValueError, match=r"sequence #1 holds item id 5, outside 0..4"):
        Popularity.fit([[1], [2, 5]], n_items=4)
