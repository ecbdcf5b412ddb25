"""Training losses of the sequential recommenders.

All next-item losses take the model's hidden states at every position ``hidden [B, L, d]``, the
next-item targets ``targets [B, L]`` (0 = padding: such positions never contribute) and the item
embedding table ``items [n_items + 1, d]`` (row 0 = padding, never a class and never a negative).
Scores are dot products ``hidden . items[i]``. Each returns the mean over non-padding positions.

Negative sampling (``bce``, ``sampled_ce``) draws uniformly from the catalog ``1..n_items``
using the global torch RNG (so the training loop's checkpoint captures it) and never uses the
positive itself as its negative:
- ``bce``: one negative per position, uniform over the catalog minus that position's positive
  (drawn from n_items - 1 values and shifted past the positive, so no rejection loop). Unlike
  the original SASRec code, the user's other history items may be drawn (they are rare on a
  large catalog; excluding them would need a per-user rejection loop).
- ``sampled_ce``: ``num_negatives`` distinct items per batch, shared by all its positions (one
  [P, N] matrix product instead of a [P, N, d] gather); where a shared negative equals a
  position's positive, that logit is masked out. No logQ correction is needed: sampling is uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _valid_positions(hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states [P, d] and targets [P] of the non-padding positions."""
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree on [B, L]")
    mask = targets != 0
    return hidden[mask], targets[mask]


def _check_targets(targets: torch.Tensor, n_items: int) -> None:
    if targets.numel() == 0:
        raise ValueError("no non-padding target in the batch: every sequence needs at least 2 items")
    if int(targets.max()) > n_items or int(targets.min()) < 1:
        raise ValueError(f"targets must be item ids in 1..{n_items} (0 = padding); got {int(targets.min())}..{int(targets.max())}")


class _ChunkedSoftmaxCE(torch.autograd.Function):
    """Sum of softmax cross-entropies of ``h @ items.T``, computed ``chunk`` rows at a time.

    Never materialises the [P, n_items] logits (nor their gradient): the forward pass keeps
    only each row's log-sum-exp, the backward pass recomputes each chunk's logits and turns
    them into probabilities with one in-place exp. The blocks stay cache-sized, which on
    2 CPU cores is faster than the plain version for ML-1M-sized batches, and memory is a
    fraction of it.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, items: torch.Tensor, t: torch.Tensor, chunk: int) -> torch.Tensor:
        total = h.new_zeros((), dtype=torch.float64)
        lse = torch.empty(h.shape[0], dtype=h.dtype, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # keep the logits in h's precision
            for s in range(0, h.shape[0], chunk):
                logits = h[s : s + chunk] @ items.T
                log_p = torch.log_softmax(logits, dim=1)
                total -= log_p.gather(1, t[s : s + chunk, None]).sum(dtype=torch.float64)
                lse[s : s + chunk] = logits[:, 0] - log_p[:, 0]
        ctx.save_for_backward(h, items, t, lse)
        ctx.chunk = chunk
        return total.to(h.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, items, t, lse = ctx.saved_tensors
        d_h = torch.empty_like(h)
        d_items = torch.zeros_like(items)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, h.shape[0], ctx.chunk):
                hc = h[s : s + ctx.chunk]
                p = (hc @ items.T).sub_(lse[s : s + ctx.chunk, None]).exp_()  # softmax
                p[torch.arange(p.shape[0], device=p.device), t[s : s + ctx.chunk]] -= 1.0  # - one_hot
                p.mul_(grad)
                d_h[s : s + ctx.chunk] = p @ items
                d_items.addmm_(p.T, hc)
        return d_h, d_items, None, None


def ce(hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Full-softmax cross-entropy over the whole catalog (the SASRec+ recipe).

    Computed in row chunks (``chunk``; default 1024 on CPU, 8192 elsewhere) in float32 at
    least, so mixed precision never touches it and the [positions, catalog] logits never exist.
    """
    h, t = _valid_positions(hidden, targets)
    _check_targets(t, items.shape[0] - 1)
    chunk = chunk or (1024 if h.device.type == "cpu" else 8192)
    # column j of the logits is item j + 1: padding (row 0) is no class
    dtype = torch.promote_types(h.dtype, torch.float32)  # float32 at least, also under autocast
    return _ChunkedSoftmaxCE.apply(h.to(dtype), items[1:].to(dtype), t - 1, chunk) / h.shape[0]


def sample_negatives(positives: torch.Tensor, n_items: int) -> torch.Tensor:
    """One item per positive, uniform over ``1..n_items`` without that positive (global torch RNG)."""
    neg = torch.randint(1, n_items, positives.shape, device=positives.device)  # 1..n_items-1
    return neg + (neg >= positives).long()  # shift past the positive: no rejection loop


def bce(hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with one uniform negative per position (the original SASRec recipe)."""
    h, t = _valid_positions(hidden, targets)
    n_items = items.shape[0] - 1
    _check_targets(t, n_items)
    if n_items < 2:
        raise ValueError("bce needs a catalog of at least 2 items to draw a negative")
    neg = sample_negatives(t, n_items)
    dtype = torch.promote_types(h.dtype, torch.float32)
    pos_logit = (h * items[t]).sum(-1).to(dtype)
    neg_logit = (h * items[neg]).sum(-1).to(dtype)
    # per position: -log sigmoid(pos) - log(1 - sigmoid(neg)), averaged over positions
    return F.binary_cross_entropy_with_logits(pos_logit, torch.ones_like(pos_logit)) + F.binary_cross_entropy_with_logits(
        neg_logit, torch.zeros_like(neg_logit)
    )


def sampled_ce(hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Cross-entropy of the positive against ``num_negatives`` uniform negatives shared by the batch."""
    h, t = _valid_positions(hidden, targets)
    n_items = items.shape[0] - 1
    _check_targets(t, n_items)
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    k = min(num_negatives, n_items)
    neg = torch.randperm(n_items, device=t.device)[:k] + 1  # [k] distinct items
    pos_logit = (h * items[t]).sum(-1, keepdim=True)  # [P, 1]
    neg_logit = h @ items[neg].T  # [P, k]
    neg_logit = neg_logit.masked_fill(neg.unsqueeze(0) == t.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1).to(torch.promote_types(h.dtype, torch.float32))
    return F.cross_entropy(logits, torch.zeros_like(t))


def next_item_loss(
    name: str, hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor, num_negatives: int = 1
) -> torch.Tensor:
    """Dispatch on the ``loss`` param: ``ce`` | ``bce`` | ``sampled_ce``."""
    if name == "ce":
        return ce(hidden, targets, items)
    if name == "bce":
        return bce(hidden, targets, items)
    if name == "sampled_ce":
        return sampled_ce(hidden, targets, items, num_negatives)
    raise ValueError(f"unknown loss {name!r}; use ce, bce or sampled_ce")


# ------------------------------------------------------------------ Molar (joint stage) losses
# Logit-level losses for the joint DUEG stage (molar/models/molar.py scores users against items
# itself, e.g. by scaled cosine similarity, so these take logits rather than hidden states).


def uniform_negatives(targets: torch.Tensor, n_items: int, k: int) -> torch.Tensor:
    """[P, k] negatives, each uniform over the catalog 1..n_items minus its row's positive.

    Drawn from n_items - 1 values and shifted past the positive (no rejection loop), from the
    global torch RNG (checkpointed by the training loop). Paper, Appendix B: 1:1 sampling is k=1.
    """
    if n_items < 2:
        raise ValueError("negative sampling needs a catalog of at least 2 items")
    if k < 1:
        raise ValueError(f"the number of negatives must be >= 1, got {k}")
    neg = torch.randint(1, n_items, (targets.shape[0], k), device=targets.device)  # 1..n_items-1
    return neg + (neg >= targets.unsqueeze(1)).long()


def pointwise_bce(pos_logits: torch.Tensor, neg_logits: torch.Tensor) -> torch.Tensor:
    """Point-wise binary cross-entropy: positives [P] labelled 1, negatives [P, k] labelled 0.

    ``mean_P(-log sigmoid(pos)) + mean_{P,k}(-log(1 - sigmoid(neg)))``: with k = 1 this is the
    original SASRec / Molar (Appendix B) loss; with k > 1 the negative term stays on the same scale.
    """
    if neg_logits.dim() != 2 or neg_logits.shape[0] != pos_logits.shape[0]:
        raise ValueError(f"pos_logits [P] and neg_logits [P, k] disagree: {tuple(pos_logits.shape)} vs {tuple(neg_logits.shape)}")
    pos, neg = pos_logits.float(), neg_logits.float()
    return F.binary_cross_entropy_with_logits(pos, torch.ones_like(pos)) + F.binary_cross_entropy_with_logits(
        neg, torch.zeros_like(neg)
    )


def sampled_softmax_ce(pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_is_positive: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of each positive [P] against its negatives [P, k]; ``neg_is_positive`` [P, k]
    marks negatives that equal the row's positive (shared negatives), which are masked out."""
    if neg_is_positive is not None:
        neg_logits = neg_logits.masked_fill(neg_is_positive, float("-inf"))
    logits = torch.cat([pos_logits.unsqueeze(1), neg_logits], dim=1).float()
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def symmetric_info_nce(x: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """The post-alignment loss of the Molar paper (Eq. 4): symmetric InfoNCE over a batch.

    Row i of ``x`` [B, d] and row i of ``y`` [B, d'] (d' = d) are the positive pair; the other rows
    of the batch are the negatives. Similarity is cosine / ``tau``; the x->y and y->x
    cross-entropies are averaged.
    """
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"symmetric_info_nce needs two [B, d] tensors of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    logits = F.normalize(x.float(), dim=-1) @ F.normalize(y.float(), dim=-1).T / tau  # [B, B]
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


# ------------------------------------------------------------------ DuoRec's contrastive term
def in_batch_info_nce(a: torch.Tensor, b: torch.Tensor, tau: float, similarity: str = "dot") -> torch.Tensor:
    """DuoRec's contrastive loss (RecBole's DuoRec ``info_nce``, SimCLR's NT-Xent) over two views [N, d].

    The 2N views ``z = cat(a, b)`` score each other by ``similarity`` (``dot``: z z^T; ``cosine``:
    of the unit vectors) / ``tau``. Row i's positive is its pair (a_i <-> b_i); its negatives are
    the other 2N - 2 views (itself left out, as RecBole's ``mask_correlated_samples``). The mean
    over the 2N rows of the cross-entropy of the positive against [positive, negatives].
    """
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"in_batch_info_nce needs two [N, d] tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    z = torch.cat([a, b]).float()
    if similarity == "cosine":
        z = F.normalize(z, dim=-1)
    elif similarity != "dot":
        raise ValueError(f"unknown similarity {similarity!r}; use dot or cosine")
    n = a.shape[0]
    logits = (z @ z.T / tau).masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    pair = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)  # row i's positive
    # a softmax over every view but itself = over [positive, the 2N - 2 negatives]
    return F.cross_entropy(logits, pair)
