"""The genre-agreement metric of benchmarks/bench_item_knn_ml1m.py on hand-made items."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest

from benchmarks.bench_item_knn_ml1m import (
    genre_sets,
    knn_genre_agreement,
    random_pair_rate,
)


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


# Five items on the unit circle at 0, 10, 30, 90 and 100 degrees.
ANGLES = [0, 10, 30, 90, 100]
VECTORS = np.array([unit(a) for a in ANGLES])
GENRES = [frozenset("A"), frozenset("AB"), frozenset("B"), frozenset("C"), frozenset("C")]


def test_two_nearest_neighbours_by_hand():
    # neighbours (k = 2): 0 -> 1, 2; 1 -> 0, 2; 2 -> 1, 0; 3 -> 4, 2; 4 -> 3, 2
    # share a genre:      1/2       2/2       1/2       1/2       1/2   -> mean 3/5
    # same genre set:     0         0         0         1/2       1/2   -> mean 1/5
    result = knn_genre_agreement(VECTORS, GENRES, k=2)
    assert result["any"] == pytest.approx(3 / 5)
    assert result["exact"] == pytest.approx(1 / 5)
    assert result["any_se"] == pytest.approx(np.std([0.5, 1, 0.5, 0.5, 0.5], ddof=1) / math.sqrt(5))


def test_neighbours_are_by_cosine_not_dot_product():
    # k = 1: 0 -> 1, 1 -> 0, 2 -> 1, 3 -> 4, 4 -> 3: all share a genre; 3 and 4 have the same set.
    assert knn_genre_agreement(VECTORS, GENRES, k=1) == pytest.approx({"any": 1.0, "exact": 2 / 5, "any_se": 0.0})
    # Item 2 ten times longer: by dot product item 0's nearest would become item 2 (8.7 > 0.98), sharing no genre.
    scaled = VECTORS * np.array([[1], [1], [10], [1], [1]])
    assert knn_genre_agreement(scaled, GENRES, k=1)["any"] == 1.0


def test_an_item_is_not_its_own_neighbour():
    # Items 0 and 1 at the same point: each is the other's nearest, never its own.
    vectors = np.array([unit(0), unit(0), unit(90)])
    genres = [frozenset("A"), frozenset("B"), frozenset("A")]
    # 0 -> 1 (no), 1 -> 0 (no), 2 -> 0 (the lower index of the tie at 90 degrees; shares A)
    assert knn_genre_agreement(vectors, genres, k=1)["any"] == pytest.approx(1 / 3)


def test_random_pair_rate_by_hand():
    # pairs of {A}, {A,B}, {B}, {C}: (0,1) share A, (1,2) share B; the other 4 share nothing; no set repeats
    assert random_pair_rate(GENRES[:4]) == pytest.approx({"any": 2 / 6, "exact": 0.0})
    # adding a second {C}: 3 of 10 pairs share a genre, 1 of 10 has the same set
    assert random_pair_rate(GENRES) == pytest.approx({"any": 3 / 10, "exact": 1 / 10})


def test_all_other_items_as_neighbours_give_the_random_pair_rate():
    # With k = n - 1 every other item is a neighbour: the mean over items is the rate over pairs.
    assert knn_genre_agreement(VECTORS, GENRES, k=4)["any"] == pytest.approx(random_pair_rate(GENRES)["any"])
    assert knn_genre_agreement(VECTORS, GENRES, k=4)["exact"] == pytest.approx(random_pair_rate(GENRES)["exact"])


def test_k_must_leave_a_neighbour_out_and_lengths_must_agree():
    with pytest.raises(ValueError, match="k must be in 1..4"):
        knn_genre_agreement(VECTORS, GENRES, k=5)
    with pytest.raises(ValueError, match="5 vectors but 4 genre sets"):
        knn_genre_agreement(VECTORS, GENRES[:4], k=2)


def test_genre_sets_from_movielens_attributes():
    items = pl.DataFrame({"attributes": [json.dumps({"genres": "Animation, Children's, Comedy", "year": 1995}),
                                         json.dumps({"year": 1990})]})
    assert genre_sets(items) == [frozenset({"Animation", "Children's", "Comedy"}), frozenset()]
