"""Fixed ZCA whitening of a catalog of frozen item vectors (MIRM states, item content).

LLM states share one dominant direction, and once centred a few directions hold most of the
spread while what tells items apart lies in the small ones (molar/models/dueg.py:item_adapter_for).
A learned map over such vectors is badly conditioned; whitening them with the catalog's own
statistics first gives every direction unit variance. Used by DUEG's ``whiten`` item adapter and
by content SASRec (molar/models/content_sasrec.py).
"""

from __future__ import annotations

import torch
from torch import nn

WHITEN_FLOOR = 1e-5  # eigenvalues below this fraction of the largest are floored (a catalog smaller than the width has null directions)


class ItemWhitening(nn.Module):
    """``(x - mean) @ matrix.T`` with fixed catalog statistics: ZCA whitening (``Sigma^-1/2``) times
    ``scale``. Buffers, not parameters: saved and loaded with the model, never trained."""

    def __init__(self, dim: int, catalog: torch.Tensor | None = None, scale: float = 1.0) -> None:
        super().__init__()
        mean, matrix = torch.zeros(dim), torch.eye(dim) * scale
        if catalog is not None:
            if catalog.dim() != 2 or catalog.shape[1] != dim or catalog.shape[0] < 2:
                raise ValueError(f"whitening needs a catalog [n_items >= 2, {dim}], got {tuple(catalog.shape)}")
            x = catalog.detach().double()
            centred = x - x.mean(0)
            eigenvalues, vectors = torch.linalg.eigh(centred.T @ centred / (x.shape[0] - 1))
            floor = eigenvalues.max().clamp(min=1e-30) * WHITEN_FLOOR
            inv_sqrt = vectors @ torch.diag(eigenvalues.clamp(min=floor).rsqrt()) @ vectors.T
            mean, matrix = x.mean(0).float(), (scale * inv_sqrt).float()
        self.register_buffer("mean", mean)
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) @ self.matrix.to(x.dtype).T
