"""Full-catalog evaluator: hand-computed ranks and metrics, ties, masking, streaming invariance."""

from __future__ import annotations

import math

import pytest
import torch

import molar.evaluate as ev
from molar.evaluate import (
    NonFiniteScoreError,
    evaluate_embeddings,
    evaluate_scorer,
    expected_random_metrics,
    metrics_from_scores,
    target_ranks,
)

NAN, INF = float("nan"), float("inf")
LOG2_3 = math.log2(3)  # 1.584962500721156 -> NDCG of rank 1 is 1 / 1.58496 = 0.63093
LOG2_4 = 2.0  # NDCG of rank 2 is 1 / 2 = 0.5


def brute_force_rank(row: list[float], target: int, masked: set[int]) -> int:
    """The definition, spelled out: unmasked non-padding items (not the target) scoring >= it."""
    return sum(1 for j in range(1, len(row)) if j != target and j not in masked and row[j] >= row[target])


# ---------------------------------------------------------------------- hand-computed cases

# Columns: [padding, item 1, item 2, item 3, item 4, item 5].
TWO_USERS = torch.tensor(
    [
        [9.0, 0.1, 0.9, 0.5, 0.3, 0.7],  # target 3 (0.5): items 2 (0.9), 5 (0.7) above -> rank 2
        [100.0, 0.2, 0.1, 0.4, 0.3, 0.0],  # target 4 (0.3): item 3 (0.4) above -> rank 1
    ]
)
TWO_TARGETS = torch.tensor([3, 4])


def test_hand_computed_ranks_ignore_the_padding_column():
    # Column 0 scores 9 and 100, far above everything: it must never count.
    assert target_ranks(TWO_USERS, TWO_TARGETS).tolist() == [2, 1]


def test_hand_computed_metrics():
    m = metrics_from_scores(TWO_USERS, TWO_TARGETS, ks=(3, 2, 1))
    assert list(m) == ["ndcg@1", "recall@1", "ndcg@2", "recall@2", "ndcg@3", "recall@3"]
    # @1: neither user at rank 0.
    assert m["ndcg@1"] == 0.0 and m["recall@1"] == 0.0
    # @2: user 1 (rank 1) hits with 1/log2(1 + 2) = 1/log2(3); user 0 (rank 2) misses.
    assert m["recall@2"] == 0.5
    assert m["ndcg@2"] == pytest.approx((0 + 1 / LOG2_3) / 2)  # 0.31546
    # @3: both hit; user 0 gets 1/log2(2 + 2) = 1/2.
    assert m["recall@3"] == 1.0
    assert m["ndcg@3"] == pytest.approx((1 / LOG2_4 + 1 / LOG2_3) / 2)  # 0.56546


def test_rank_zero_scores_one():
    scores = torch.tensor([[0.0, 0.2, 0.9, 0.1]])
    assert metrics_from_scores(scores, torch.tensor([2]), ks=(1,)) == {"ndcg@1": 1.0, "recall@1": 1.0}


def test_scores_are_not_modified():
    scores = TWO_USERS.clone()
    metrics_from_scores(scores, TWO_TARGETS, exclude=[[2, 5], [3]])
    assert torch.equal(scores, TWO_USERS)


# ----------------------------------------------------------------------------------- ties


def test_tie_with_target_counts_against_it():
    # Items 1 and 2 both score 0.5: whichever is the target, the other ranks above it.
    scores = torch.tensor([[0.0, 0.5, 0.5, 0.1, 0.2, 0.3]] * 2)
    assert target_ranks(scores, torch.tensor([1, 2])).tolist() == [1, 1]
    m = metrics_from_scores(scores, torch.tensor([1, 2]), ks=(1, 2))
    assert m["recall@1"] == 0.0 and m["ndcg@1"] == 0.0
    assert m["ndcg@2"] == pytest.approx(1 / LOG2_3)


def test_constant_scorer_gets_the_worst_rank():
    scores = torch.full((1, 6), 3.0)  # 5 items, all tied
    assert target_ranks(scores, torch.tensor([4])).tolist() == [4]
    assert target_ranks(scores, torch.tensor([4]), exclude=[[1, 2]]).tolist() == [2]


# -------------------------------------------------------------------------------- masking

MASK_ROW = torch.tensor([[0.0, 0.9, 0.8, 0.1, 0.5, 0.7]])  # target 4 (0.5); 1, 2, 5 above it
MASK_TARGET = torch.tensor([4])


@pytest.mark.parametrize(
    ("history", "rank"),
    [
        ([], 3),
        ([1, 5], 1),  # masked items above the target do not count
        ([1, 1, 5, 5, 1], 1),  # repeats mask once
        ([3], 3),  # a masked item below the target changes nothing
        ([4, 1], 2),  # the target is never masked, even in its own history
        ([0, 0, 2], 2),  # padding ids in a history are harmless
        ([1, 2, 5], 0),
    ],
)
def test_masking(history, rank):
    assert target_ranks(MASK_ROW, MASK_TARGET, exclude=[history]).tolist() == [rank]


def test_masked_items_never_count_even_when_tied_at_minus_infinity():
    scores = torch.tensor([[0.0, -INF, -INF, -INF, -INF, -INF]])
    # Target 3 at -inf ties with all 4 others (pessimistic: rank 4); masking 2 of them leaves 2.
    assert target_ranks(scores, torch.tensor([3])).tolist() == [4]
    assert target_ranks(scores, torch.tensor([3]), exclude=[[1, 5]]).tolist() == [2]


def test_infinite_scores_are_ranked():
    scores = torch.tensor([[0.0, INF, 1.0, -INF, 2.0]])
    assert target_ranks(scores, torch.tensor([1])).tolist() == [0]
    assert target_ranks(scores, torch.tensor([3])).tolist() == [3]


# --------------------------------------------------------------------------------- errors


def test_nan_score_is_an_error_naming_the_user_and_item():
    scores = TWO_USERS.clone()
    scores[1, 2] = NAN
    with pytest.raises(NonFiniteScoreError, match=r"user #1 for item id 2 is NaN"):
        metrics_from_scores(scores, TWO_TARGETS)


def test_nan_in_the_padding_column_is_ignored():
    scores = TWO_USERS.clone()
    scores[:, 0] = NAN  # e.g. a cosine model with an all-zero padding embedding (0/0)
    assert target_ranks(scores, TWO_TARGETS).tolist() == [2, 1]


def test_plus_and_minus_infinity_in_one_row_is_not_mistaken_for_nan():
    scores = torch.tensor([[0.0, INF, -INF, 1.0]])  # the row sum is NaN, the scores are not
    assert target_ranks(scores, torch.tensor([3])).tolist() == [1]


@pytest.mark.parametrize(
    ("targets", "message"),
    [([0, 4], "user #0 is item id 0"), ([3, 6], "user #1 is item id 6"), ([3], "one item id per user")],
)
def test_bad_targets(targets, message):
    with pytest.raises(ValueError, match=message):
        metrics_from_scores(TWO_USERS, torch.tensor(targets))


def test_bad_history_id_names_the_user():
    with pytest.raises(ValueError, match=r"user #1 holds item id 7"):
        metrics_from_scores(TWO_USERS, TWO_TARGETS, exclude=[[1], [2, 7]])


def test_bad_ks_and_integer_scores():
    with pytest.raises(ValueError, match="positive integers"):
        metrics_from_scores(TWO_USERS, TWO_TARGETS, ks=(0, 10))
    with pytest.raises(ValueError, match="floating-point"):
        metrics_from_scores(TWO_USERS.long(), TWO_TARGETS)


# ------------------------------------------------------------------ streaming invariance


def random_case(n_users: int, n_items: int, seed: int):
    """Integer-valued scores (many exact ties), histories with repeats, padding and targets."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 6, (n_users, n_items + 1), generator=g).float()
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g)
    histories = []
    for u in range(n_users):
        length = int(torch.randint(0, 12, (1,), generator=g))
        history = torch.randint(0, n_items + 1, (length,), generator=g).tolist()
        if u % 4 == 0:
            history.append(int(targets[u]))  # the target inside its own history
        histories.append(history)
    return scores, targets, histories


def test_ranks_match_the_definition_on_random_ties_and_masks():
    scores, targets, histories = random_case(50, 15, seed=0)
    expected = [
        brute_force_rank(scores[u].tolist(), int(targets[u]), set(histories[u])) for u in range(len(histories))
    ]
    assert target_ranks(scores, targets, histories).tolist() == expected


@pytest.mark.parametrize("mask_history", [True, False])
def test_scorer_gives_identical_metrics_for_every_chunk_size(mask_history):
    scores, targets, histories = random_case(41, 17, seed=1)
    index_of = {id(h): u for u, h in enumerate(histories)}

    def score_fn(batch):
        return scores[[index_of[id(h)] for h in batch]]

    ks = (1, 5, 10)
    reference = metrics_from_scores(scores, targets, histories if mask_history else None, ks)
    for chunk_size in (1, 3, 7, len(histories), 1000):
        got = evaluate_scorer(score_fn, histories, targets, 17, ks, mask_history, chunk_size, progress=False)
        assert got == reference, chunk_size  # bit-identical, not approximately


def test_small_tiles_give_the_same_ranks(monkeypatch):
    scores, targets, histories = random_case(37, 23, seed=2)
    expected = target_ranks(scores, targets, histories)
    monkeypatch.setattr(ev, "_TILE_BYTES", 4 * 24 * 3)  # 3 rows per tile
    monkeypatch.setattr(ev, "_MIN_TILE_ROWS", 1)
    assert torch.equal(target_ranks(scores, targets, histories), expected)


def test_nan_in_a_later_chunk_names_the_global_user():
    scores, targets, histories = random_case(10, 5, seed=3)
    scores[8, 3] = NAN
    chunks = iter(range(0, 10, 4))

    def score_fn(batch):
        start = next(chunks)
        return scores[start : start + len(batch)]

    with pytest.raises(NonFiniteScoreError, match=r"user #8 for item id 3"):
        evaluate_scorer(score_fn, histories, targets, 5, chunk_size=4, progress=False)


def test_score_fn_with_wrong_shape_is_an_error():
    with pytest.raises(ValueError, match=r"expected \[2, n_items \+ 1 = 6\]"):
        evaluate_scorer(lambda b: torch.zeros(len(b), 5), [[1], [2]], [3, 4], 5, progress=False)


def test_half_precision_scores_and_progress_bar():
    scores, targets, histories = random_case(9, 8, seed=4)
    got = evaluate_scorer(lambda b: scores[: len(b)].half(), histories, targets, 8, progress=True)
    assert got == metrics_from_scores(scores, targets, histories)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_embeddings_match_the_dense_scores(chunk_size, monkeypatch):
    # Small integer embeddings: dot products are exact in float32, so ties are exact too.
    g = torch.Generator().manual_seed(5)
    users, items = torch.randint(-2, 3, (30, 4), generator=g).float(), torch.randint(-2, 3, (13, 4), generator=g).float()
    _, targets, histories = random_case(30, 12, seed=6)
    expected = metrics_from_scores(users @ items.T, targets, histories, ks=(1, 3, 10))
    monkeypatch.setattr(ev, "_MIN_TILE_ROWS", 1)
    monkeypatch.setattr(ev, "_TILE_BYTES", 4 * 13 * 2)  # 2 users per tile inside each chunk
    got = evaluate_embeddings(users, items, targets, histories, ks=(1, 3, 10), chunk_size=chunk_size, progress=False)
    assert got == expected
    no_mask = evaluate_embeddings(users, items, targets, None, ks=(1, 3, 10), chunk_size=chunk_size, progress=False)
    assert no_mask == metrics_from_scores(users @ items.T, targets, None, ks=(1, 3, 10))


def test_embeddings_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same d"):
        evaluate_embeddings(torch.zeros(2, 4), torch.zeros(5, 3), [1, 2], progress=False)


# ------------------------------------------------------------------- random-ranking floor


def test_expected_random_metrics_by_hand():
    # 4 items; history {1, 2} minus the target 2 masks only item 1 -> 3 candidates.
    m = expected_random_metrics([[1, 1, 2]], [2], n_items=4, ks=(1, 2, 5))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@5"] == pytest.approx(1.0)
    assert m["ndcg@2"] == pytest.approx((1 + 1 / LOG2_3) / 3)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / LOG2_3 + 1 / LOG2_4) / 3)
    unmasked = expected_random_metrics([[1, 1, 2]], [2], n_items=4, ks=(1,), mask_history=False)
    assert unmasked["recall@1"] == pytest.approx(1 / 4)


def test_uniform_random_scores_match_the_expectation():
    n_users, n_items, ks = 20000, 30, (1, 10, 20)
    g = torch.Generator().manual_seed(7)
    scores = torch.rand(n_users, n_items + 1, generator=g)
    targets = torch.randint(1, n_items + 1, (n_users,), generator=g)
    lengths = torch.randint(0, 8, (n_users,), generator=g).tolist()
    histories = [torch.randint(0, n_items + 1, (n,), generator=g).tolist() for n in lengths]
    measured = metrics_from_scores(scores, targets, histories, ks)
    expected = expected_random_metrics(histories, targets.tolist(), n_items, ks)
    # Per-user recall is Bernoulli (sd <= 0.5): the mean of 20k users has sd <= 0.0036.
    for key in expected:
        assert measured[key] == pytest.approx(expected[key], abs=0.015), key
    # Forgetting the mask would overstate recall@10 by ~ 10/26.5 - 10/30 = 0.044: detectable.
    assert expected["recall@10"] > expected_random_metrics(histories, targets.tolist(), n_items, (10,), False)["recall@10"] + 0.03


def test_no_users_is_an_error():
    with pytest.raises(ValueError, match="no users"):
        metrics_from_scores(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match="no users"):
        evaluate_scorer(lambda b: torch.zeros(len(b), 6), [], [], 5, progress=False)


def test_nan_in_embeddings_is_an_error():
    users, items = torch.ones(3, 2), torch.ones(5, 2)
    users[2, 1] = NAN
    with pytest.raises(NonFiniteScoreError, match=r"user #2 for item id 1"):
        evaluate_embeddings(users, items, [1, 2, 3], progress=False)


def test_nan_in_an_item_embedding_is_an_error_naming_the_item():
    # NaN * x and NaN + x are NaN in every kernel, whatever its summation order or FMA use
    # (an overflow, inf - inf, is not: a kernel may round it to inf instead; see the next tests)
    users, items = torch.ones(2, 2), torch.ones(4, 2)
    items[2, 0] = NAN
    with pytest.raises(NonFiniteScoreError, match=r"user #0 for item id 2"):
        evaluate_embeddings(users, items, [1, 3], progress=False)


def test_infinite_dot_products_are_ranked():
    # One infinite coordinate per item and positive user weights: +inf, 2, -inf exactly (no inf - inf).
    # The row sum (inf - inf = NaN) trips the cheap NaN screen, and the exact check must clear it.
    users = torch.tensor([[1.0, 1.0]])
    items = torch.tensor([[0.0, 0.0], [INF, 1.0], [1.0, 1.0], [-INF, 1.0]])
    assert evaluate_embeddings(users, items, [1], ks=(1,), progress=False) == {"ndcg@1": 1.0, "recall@1": 1.0}
    # the -inf target ties with nothing and has both other items above it: rank 2
    assert evaluate_embeddings(users, items, [3], ks=(3,), progress=False)["recall@3"] == 1.0
    assert evaluate_embeddings(users, items, [3], ks=(2,), progress=False)["recall@2"] == 0.0


def test_embeddings_that_could_overflow_are_screened_for_nan():
    # Whether 1e20 * 1e20 - 1e20 * 1e20 comes out NaN or inf depends on the BLAS kernel; what
    # the evaluator guarantees is that it screens every tile once the dot products *may* overflow
    # (d * max|u| * max|v| within a factor 2 of the float32 maximum, 3.4e38).
    def safe(user_max: float, item_max: float, d: int = 2) -> bool:
        users, items = torch.full((3, d), user_max), torch.full((4, d), -item_max)
        items[0] = 1e30  # the padding row is never read: it does not count
        return ev._dot_products_are_safe(users, items, torch.float32)

    assert safe(1e18, 1e18)  # bound 2e36
    assert not safe(1e19, 1e19)  # bound 2e38 > 1.7e38
    assert not safe(1e18, 1e18, d=200)  # the bound grows with the width: 2e38
    assert ev._dot_products_are_safe(torch.full((1, 2), 1e19), torch.full((2, 2), 1e19), torch.float64)
    assert not safe(INF, 1.0) and not safe(NAN, 1.0)  # non-finite inputs: always screened


def test_nan_padding_embedding_is_ignored():
    users, items = torch.tensor([[1.0, 0.0]]), torch.tensor([[NAN, NAN], [2.0, 0.0], [1.0, 0.0]])
    assert evaluate_embeddings(users, items, [2], ks=(2,), progress=False)["recall@2"] == 1.0
