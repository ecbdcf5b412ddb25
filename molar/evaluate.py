"""Full-catalog ranking metrics (NDCG@K, Recall@K), streamed over chunks of users.

Conventions (the same for every entry point, so all of them give the same numbers):

* Column ``j`` of a score matrix scores item id ``j``. Column 0 is the padding id: it is never
  read, never ranked and never counts (a model may leave anything there, even NaN).
* Leave-one-out: one target item per user. Its rank is counted, not sorted for: the number of
  candidate items whose score is ``>=`` the target's score, the target itself not included.
  Ranks are 0-based; NDCG@K = 1 / log2(rank + 2) and Recall@K = 1 when rank < K, else 0.
* Ties are pessimistic: an item scoring exactly the target's score counts as ranked above it,
  so a constant scorer gets the worst rank, never a lucky one.
* Masking (``exclude``, usually the user's history) removes items from the candidates; a masked
  item never counts, however high it scores, and repeats in a history mask once. The target is
  never masked, even when it appears in its own history (re-consumption is a valid hit).
* NaN scores are a model bug and raise :class:`NonFiniteScoreError`; +inf and -inf are ranked.

How it stays fast and bounded: users go in chunks (``chunk_size``, the unit for ``score_fn``
and for flattening masks); each chunk is ranked in row tiles of at most ``_TILE_BYTES``,
through one reused score buffer. Per tile: scores are written (matrix product or copy), the
target scores gathered, padding and masked entries overwritten with NaN (which compares False,
so they never count), the target score written back, and the tile compared in place
(``tile >= target`` as 0/1 floats) and summed per row.
Metrics accumulate as integer counts per rank below max(K), so every chunk size gives
bit-identical results. Memory: one tile + the chunk's score rows (scorer path) + the chunk's
mask indices, plus one 8-byte rank per user on the scorer path (``scorer_ranks`` keeps them for
the per-user metrics, :func:`per_user_metrics`, that the significance tests compare).
"""

from __future__ import annotations

import math
from itertools import chain
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

ScoreFn = Callable[[list[Sequence[int]]], Tensor]

# Bytes of float scores per row tile: the evaluator's working memory on top of what score_fn
# returns. Each tile costs a handful of whole-tile operations, so tiles much smaller than this
# lose more to per-operation overhead (and, on a shared machine, to waiting for the slowest
# thread at every operation) than they gain from staying in cache: on our 2-core box, 64 MiB
# tiles ran 2-4x faster than 2-4 MiB ones under load and no slower than whole chunks.
_TILE_BYTES = 64 << 20
_MIN_TILE_ROWS = 8  # fewer rows per matrix product wastes the BLAS kernel


class NonFiniteScoreError(ValueError):
    """A model produced NaN scores; ranking them would silently give a wrong number.

    Not a UserError: NaN scores come from the model or its training code, so the stage keeps the
    traceback that shows where."""


# ------------------------------------------------------------------------------------ public


def metrics_from_scores(
    scores: Tensor,
    targets: Tensor | Sequence[int],
    exclude: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (10, 20),
) -> dict[str, float]:
    """NDCG@K and Recall@K of one target per user, averaged over users.

    Args:
        scores: float tensor [users, items]; column j scores item id j, column 0 (padding) is
            ignored. Not modified.
        targets: long tensor [users] of item ids in 1..items-1.
        exclude: per user, item ids to mask (usually the history), or None for no masking.
        ks: cut-offs; the result has "ndcg@K" and "recall@K" for each, ks ascending.
    """
    histogram = _RankHistogram(ks)
    histogram.add(target_ranks(scores, targets, exclude))
    return histogram.metrics()


def target_ranks(
    scores: Tensor,
    targets: Tensor | Sequence[int],
    exclude: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """0-based rank of each user's target among the unmasked items (ties pessimistic).

    Same arguments and conventions as :func:`metrics_from_scores`; returns a long tensor
    [users]. Useful for per-user analyses (significance tests, breakdowns by history length).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [users, items], got shape {tuple(scores.shape)}")
    n_users, n_cols = scores.shape
    _check_floating(scores, "scores")
    targets_t = _targets_tensor(targets, n_users, n_cols)
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude has {len(exclude)} lists for {n_users} users; give one per user")
    buffers = _TileBuffers(n_cols, _buffer_dtype(scores.dtype, n_cols), scores.device, n_users)
    masks = _flatten_exclude(exclude, n_cols, buffers.rows, first_user=0) if exclude is not None else None
    with torch.no_grad():
        write = lambda a, b, out: out.copy_(scores[a:b])  # noqa: E731 - the caller's tensor is only read
        return _rank_chunk(write, targets_t.to(buffers.device), masks, buffers, 0)


def frozen_scorer(model: torch.nn.Module) -> Callable[[list[list[int]]], Tensor]:
    """``score_fn(histories) -> [B, n_items + 1]`` (float32, CPU) from a model with
    ``score(histories)``: run in eval mode under no_grad, the model's own mode restored after."""

    def score_fn(histories: list[list[int]]) -> Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return model.score(histories).float().cpu()
        finally:
            model.train(was_training)

    return score_fn


def evaluate_scorer(
    score_fn: ScoreFn,
    histories: Sequence[Sequence[int]],
    targets: Tensor | Sequence[int],
    n_items: int,
    ks: Sequence[int] = (10, 20),
    mask_history: bool = True,
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[str, float]:
    """Full-catalog metrics of a model given as ``score_fn``: :func:`metrics_from_ranks` of
    :func:`scorer_ranks` (same arguments)."""
    ks = _check_ks(ks)  # before any scoring
    return metrics_from_ranks(scorer_ranks(score_fn, histories, targets, n_items, mask_history, chunk_size, progress), ks)


def scorer_ranks(
    score_fn: ScoreFn,
    histories: Sequence[Sequence[int]],
    targets: Tensor | Sequence[int],
    n_items: int,
    mask_history: bool = True,
    chunk_size: int = 1024,
    progress: bool = True,
) -> Tensor:
    """0-based rank of each user's target (ties pessimistic) under ``score_fn``, streamed over user chunks.

    Returns a long tensor [users] on the CPU, in the order of ``histories``: the ranks every metric
    of the model is computed from (:func:`metrics_from_ranks`, :func:`per_user_metrics`).

    Args:
        score_fn: called (under ``torch.no_grad()``) with a list of up to ``chunk_size``
            histories; returns a float tensor [len(list), n_items + 1] (column 0 = padding,
            ignored). The evaluator copies it and never writes to it, so a broadcast view
            (``row.expand(B, -1)``) is fine.
        histories: per user, the item ids the model may condition on; also the mask when
            ``mask_history``.
        targets: per user, the held-out item id (1..n_items).
        n_items: catalog size; item ids are 1..n_items.
        chunk_size: users per ``score_fn`` call; bounds memory, never changes the result.
        progress: show a tqdm bar over users.
    """
    n_users = len(histories)
    if n_users == 0:
        raise ValueError("no users to evaluate: histories is empty")
    _check_chunk_size(chunk_size)
    n_cols = n_items + 1
    targets_t = _targets_tensor(targets, n_users, n_cols)
    ranks = torch.empty(n_users, dtype=torch.long)
    buffers: _TileBuffers | None = None
    with torch.no_grad(), tqdm(total=n_users, unit="user", desc="evaluate", disable=not progress) as bar:
        for start in range(0, n_users, chunk_size):
            stop = min(start + chunk_size, n_users)
            chunk = list(histories[start:stop])
            scores = score_fn(chunk)
            _check_chunk_scores(scores, stop - start, n_cols, start)
            if buffers is None:
                buffers = _TileBuffers(n_cols, _buffer_dtype(scores.dtype, n_cols), scores.device, chunk_size)
            masks = _flatten_exclude(chunk, n_cols, buffers.rows, first_user=start) if mask_history else None
            ranks[start:stop] = _rank_chunk(
                lambda a, b, out: out.copy_(scores[a:b]),
                targets_t[start:stop].to(buffers.device),
                masks,
                buffers,
                start,
            ).cpu()
            bar.update(stop - start)
            scores = None  # free this chunk's scores before score_fn allocates the next
    return ranks


def metrics_from_ranks(ranks: Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, float]:
    """NDCG@K and Recall@K averaged over users, from their 0-based target ranks."""
    histogram = _RankHistogram(ks)
    histogram.add(ranks)
    return histogram.metrics()


def per_user_metrics(ranks: Tensor, ks: Sequence[int] = (10, 20)) -> dict[str, np.ndarray]:
    """Per user (float64 arrays [users]): "ndcg@K" = 1 / log2(rank + 2) if rank < K else 0 and
    "recall@K" = 1.0 if rank < K else 0.0, in the key order of :func:`metrics_from_ranks`, whose
    values are their means (up to float summation order)."""
    ks = _check_ks(ks)
    r = ranks.cpu().numpy().astype(np.int64)
    gain = np.zeros(r.shape, dtype=np.float64)
    top = r < max(ks)
    gain[top] = _discount(max(ks))[r[top]]
    out: dict[str, np.ndarray] = {}
    for k in ks:
        hit = r < k
        out[f"ndcg@{k}"] = np.where(hit, gain, 0.0)
        out[f"recall@{k}"] = hit.astype(np.float64)
    return out


def evaluate_embeddings(
    user_emb: Tensor,
    item_emb: Tensor,
    targets: Tensor | Sequence[int],
    exclude: Sequence[Sequence[int]] | None = None,
    ks: Sequence[int] = (10, 20),
    chunk_size: int = 1024,
    progress: bool = True,
) -> dict[str, float]:
    """Full-catalog metrics of a dot-product model: score(u, i) = user_emb[u] . item_emb[i].

    Args:
        user_emb: [users, d] user (sequence) representations.
        item_emb: [n_items + 1, d]; row 0 is the padding item and is ignored.
        targets: per user, the held-out item id (1..n_items).
        exclude: per user, item ids to mask (usually the history), or None.
        chunk_size: users per block of mask indices / progress step; never changes the result.

    The scores are computed tile by tile into one reused buffer of at most ``_TILE_BYTES``;
    no [users, items] matrix ever exists. Half-precision embeddings are scored in float32.
    """
    if user_emb.dim() != 2 or item_emb.dim() != 2 or user_emb.shape[1] != item_emb.shape[1]:
        raise ValueError(
            f"user_emb must be [users, d] and item_emb [n_items + 1, d] with the same d; got "
            f"{tuple(user_emb.shape)} and {tuple(item_emb.shape)}"
        )
    _check_floating(user_emb, "user_emb")
    _check_floating(item_emb, "item_emb")
    _check_chunk_size(chunk_size)
    n_users, n_cols = user_emb.shape[0], item_emb.shape[0]
    if n_users == 0:
        raise ValueError("no users to evaluate: user_emb has 0 rows")
    if exclude is not None and len(exclude) != n_users:
        raise ValueError(f"exclude has {len(exclude)} lists for {n_users} users; give one per user")
    targets_t = _targets_tensor(targets, n_users, n_cols)
    dtype = _buffer_dtype(torch.promote_types(user_emb.dtype, item_emb.dtype), n_cols)
    buffers = _TileBuffers(n_cols, dtype, item_emb.device, chunk_size)
    histogram = _RankHistogram(ks)
    with torch.no_grad(), tqdm(total=n_users, unit="user", desc="evaluate", disable=not progress) as bar:
        item_t = item_emb.to(dtype).T  # a transposed view: the BLAS call reads it as is
        screen_nan = not _dot_products_are_safe(user_emb, item_emb, dtype)
        for start in range(0, n_users, chunk_size):
            stop = min(start + chunk_size, n_users)
            users = user_emb[start:stop].to(device=buffers.device, dtype=dtype)
            chunk = exclude[start:stop] if exclude is not None else None
            masks = _flatten_exclude(chunk, n_cols, buffers.rows, first_user=start) if chunk is not None else None
            ranks = _rank_chunk(
                lambda a, b, out: torch.mm(users[a:b], item_t, out=out),
                targets_t[start:stop].to(buffers.device),
                masks,
                buffers,
                start,
                screen_nan,
            )
            histogram.add(ranks)
            bar.update(stop - start)
    return histogram.metrics()


def expected_random_metrics(
    histories: Sequence[Sequence[int]],
    targets: Sequence[int],
    n_items: int,
    ks: Sequence[int] = (10, 20),
    mask_history: bool = True,
) -> dict[str, float]:
    """Exact expected metrics of a uniformly random ranking (continuous scores, no ties).

    With C candidates (n_items minus the distinct masked items other than the target), the
    target's rank is uniform on 0..C-1, so E[Recall@K] = min(K, C) / C and
    E[NDCG@K] = sum_{r < min(K, C)} 1 / log2(r + 2) / C. The floor any real model must beat.
    """
    if len(histories) != len(targets) or not histories:
        raise ValueError(f"need one target per history and at least one user; got {len(histories)} and {len(targets)}")
    ks = _check_ks(ks)
    targets = torch.as_tensor(targets).tolist()
    discount_cumsum = np.concatenate([[0.0], np.cumsum(_discount(max(ks)))])
    candidates = np.empty(len(histories), dtype=np.float64)
    for u, (history, target) in enumerate(zip(histories, targets)):
        masked = {i for i in history if 1 <= i <= n_items} - {target} if mask_history else set()
        candidates[u] = n_items - len(masked)
    out: dict[str, float] = {}
    for k in ks:
        top = np.minimum(k, candidates).astype(np.int64)
        out[f"ndcg@{k}"] = float(np.mean(discount_cumsum[top] / candidates))
        out[f"recall@{k}"] = float(np.mean(top / candidates))
    return out


# ---------------------------------------------------------------------------------- internals


class _RankHistogram:
    """Counts of users per rank below max(K): integer sums, so chunking never changes them."""

    def __init__(self, ks: Sequence[int]):
        self.ks = _check_ks(ks)
        self.max_k = max(self.ks)
        self.counts = np.zeros(self.max_k, dtype=np.int64)
        self.n_users = 0

    def add(self, ranks: Tensor) -> None:
        hits = ranks[ranks < self.max_k].cpu().numpy()
        self.counts += np.bincount(hits, minlength=self.max_k)
        self.n_users += ranks.numel()

    def metrics(self) -> dict[str, float]:
        if self.n_users == 0:
            raise ValueError("no users to evaluate: metrics over zero users are undefined")
        discount = _discount(self.max_k)
        out: dict[str, float] = {}
        for k in self.ks:
            out[f"ndcg@{k}"] = float((self.counts[:k] * discount[:k]).sum() / self.n_users)
            out[f"recall@{k}"] = float(self.counts[:k].sum() / self.n_users)
        return out


def _discount(max_k: int) -> np.ndarray:
    """NDCG gain of ranks 0..max_k-1: 1 / log2(rank + 2)."""
    return 1.0 / np.log2(np.arange(max_k) + 2.0)


class _TileBuffers:
    """The reused score tile (allocated once per evaluation)."""

    def __init__(self, n_cols: int, dtype: torch.dtype, device: torch.device, max_rows: int):
        if device.type == "cpu":
            rows = max(_MIN_TILE_ROWS, _TILE_BYTES // (n_cols * torch.finfo(dtype).bits // 8))
        else:  # accelerators: one tile per chunk (fewer kernel launches; chunk_size bounds memory)
            rows = max_rows
        self.rows = max(1, min(rows, max_rows))
        self.n_cols = n_cols
        self.device = device
        self.scores = torch.empty(self.rows, n_cols, dtype=dtype, device=device)


class _ChunkMasks:
    """A chunk's exclude lists as flat indices into the score tile each row lands in."""

    def __init__(self, flat_index: np.ndarray, row_start: np.ndarray):
        self.flat_index = flat_index  # (row % tile_rows) * n_cols + item, in row order
        self.row_start = row_start  # row_start[r]: first entry of row r; row_start[-1] = total

    def for_rows(self, a: int, b: int) -> np.ndarray:
        """The entries of rows a..b-1 (one tile), a view."""
        return self.flat_index[self.row_start[a] : self.row_start[b]]


def _flatten_exclude(
    exclude: Sequence[Sequence[int]], n_cols: int, tile_rows: int, first_user: int
) -> _ChunkMasks:
    # One vectorised pass per chunk (numpy: single-threaded, no per-user tensors), with the
    # offsets of each row inside its tile already added, so a tile's masks are a plain slice.
    lengths = np.fromiter(map(len, exclude), dtype=np.int64, count=len(exclude))
    total = int(lengths.sum())
    items = np.fromiter(chain.from_iterable(exclude), dtype=np.int64, count=total)
    if total and (items.min() < 0 or items.max() >= n_cols):
        bad = int(np.flatnonzero((items < 0) | (items >= n_cols))[0])
        user = int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
        raise ValueError(
            f"history/exclude list of user #{first_user + user} holds item id {int(items[bad])}, "
            f"outside 0..{n_cols - 1} (0 = padding, 1..{n_cols - 1} = items); check the id mapping"
        )
    row_start = np.zeros(len(exclude) + 1, dtype=np.int64)
    np.cumsum(lengths, out=row_start[1:])
    items += np.repeat(np.arange(len(exclude), dtype=np.int64) % tile_rows * n_cols, lengths)
    return _ChunkMasks(items, row_start)


def _fill_nan(tile: Tensor, flat_index: np.ndarray) -> None:
    """tile.view(-1)[flat_index] = NaN."""
    if tile.device.type == "cpu":
        # numpy writes into the tensor's memory single-threaded: for a few thousand entries
        # that beats a parallel torch kernel, which on a busy machine waits for both threads.
        tile.numpy().reshape(-1)[flat_index] = np.nan
    else:
        tile.view(-1).index_fill_(0, torch.from_numpy(flat_index).to(tile.device), float("nan"))


def _rank_chunk(
    write_scores: Callable[[int, int, Tensor], object],
    targets: Tensor,
    masks: _ChunkMasks | None,
    buffers: _TileBuffers,
    first_user: int,
    screen_nan: bool = True,
) -> Tensor:
    """Pessimistic 0-based target ranks for one chunk; ``write_scores(a, b, out)`` fills rows a..b-1.

    ``masks`` must come from ``_flatten_exclude(..., tile_rows=buffers.rows)``. ``screen_nan``
    may be False only when the scores provably hold no NaN (see ``_dot_products_are_safe``).
    """
    n_rows = targets.shape[0]
    ranks = torch.empty(n_rows, dtype=torch.long, device=buffers.device)
    for a in range(0, n_rows, buffers.rows):
        b = min(a + buffers.rows, n_rows)
        tile = buffers.scores[: b - a]
        write_scores(a, b, tile)
        if screen_nan:
            tile[:, 0] = 0.0  # padding column: never read, so whatever the model put there is harmless
            if torch.isnan(tile.sum()):  # cheap screen; inf - inf can trip it, so confirm exactly
                _raise_if_nan(tile, first_user + a)
        target_col = targets[a:b, None]
        target_score = tile.gather(1, target_col)
        tile[:, 0] = float("nan")  # NaN >= x is False: padding and masked items never count
        if masks is not None:
            _fill_nan(tile, masks.for_rows(a, b))
        tile.scatter_(1, target_col, target_score)  # the target is never masked
        # In place, the tile becomes 1.0 where an item counts, and a float row sum counts them
        # exactly (n_cols < 2**24, see _buffer_dtype). Not (tile >= t).sum(1): summing a bool
        # tensor first casts it to a temporary int64 copy 8x its size, which is most of the cost.
        tile.ge_(target_score)
        ranks[a:b] = tile.sum(1) - 1  # minus the target itself
    return ranks


def _dot_products_are_safe(user_emb: Tensor, item_emb: Tensor, dtype: torch.dtype) -> bool:
    """True when user_emb @ item_emb[1:].T cannot hold NaN, so no tile needs screening.

    With finite inputs NaN can only come from an overflow to inf followed by inf - inf; every
    partial sum of a d-term dot product is bounded by d * max|u| * max|v|, so if that bound
    (with a factor-2 margin for rounding) is below the dtype's largest value, nothing
    overflows. A NaN or inf input makes the bound non-finite and the tiles get screened.
    """
    bound = float(user_emb.shape[1])
    for emb in (user_emb, item_emb[1:]):  # row 0 of item_emb: padding, its column is never read
        if emb.numel() == 0:
            return True
        low, high = torch.aminmax(emb)
        bound *= max(-float(low), float(high))
    return math.isfinite(bound) and bound < torch.finfo(dtype).max / 2


def _raise_if_nan(tile: Tensor, first_user: int) -> None:
    nan = torch.isnan(tile)
    if not bool(nan.any()):
        return
    row, col = (int(v) for v in nan.nonzero()[0])
    raise NonFiniteScoreError(
        f"score of user #{first_user + row} for item id {col} is NaN ({int(nan.sum())} NaN scores "
        f"in this block of users). NaN scores are a model bug (an overflow, 0/0 in a normalisation, "
        f"a diverged or collapsed embedding); ranking them would give a silently wrong metric."
    )


def _targets_tensor(targets: Tensor | Sequence[int], n_users: int, n_cols: int) -> Tensor:
    targets_t = torch.as_tensor(targets)
    if targets_t.dim() != 1 or targets_t.shape[0] != n_users:
        raise ValueError(f"targets must be one item id per user ({n_users}), got shape {tuple(targets_t.shape)}")
    if targets_t.dtype.is_floating_point or targets_t.dtype == torch.bool:
        raise ValueError(f"targets must be integer item ids, got dtype {targets_t.dtype}")
    targets_t = targets_t.long().cpu()
    bad = (targets_t < 1) | (targets_t >= n_cols)
    if bool(bad.any()):
        user = int(bad.nonzero()[0])
        raise ValueError(
            f"target of user #{user} is item id {int(targets_t[user])}, outside 1..{n_cols - 1} "
            f"(0 is the padding id and can never be a target)"
        )
    return targets_t


def _check_chunk_scores(scores: object, n_rows: int, n_cols: int, first_user: int) -> None:
    if not isinstance(scores, Tensor):
        raise TypeError(f"score_fn must return a torch.Tensor, got {type(scores).__name__}")
    if tuple(scores.shape) != (n_rows, n_cols):
        raise ValueError(
            f"score_fn returned shape {tuple(scores.shape)} for users #{first_user}..#{first_user + n_rows - 1}; "
            f"expected [{n_rows}, n_items + 1 = {n_cols}] (column 0 = padding)"
        )
    _check_floating(scores, "score_fn output")


def _check_floating(t: Tensor, name: str) -> None:
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _buffer_dtype(dtype: torch.dtype, n_cols: int) -> torch.dtype:
    # float64 stays exact; half precisions are ranked in float32 (exact upcast, fast kernels).
    # The rank count sums 0/1 floats: exact in float32 only below 2**24 items.
    return torch.float64 if dtype == torch.float64 or n_cols >= 2**24 else torch.float32


def _check_ks(ks: Sequence[int]) -> list[int]:
    ks = list(ks)
    if not ks or any(not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty list of positive integers, e.g. [10, 20], got {ks}")
    return sorted({int(k) for k in ks})


def _check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of users, got {chunk_size}")
