"""SASRec (Kang & McAuley 2018): causal self-attention over a user's item history.

The architecture of the reference PyTorch port (pmixer/SASRec.pytorch), pre-LN blocks:
item embeddings (row 0 = padding) scaled by sqrt(d), learned absolute positions (0 = padding),
embedding dropout, ``num_blocks`` x [x + MHA(LN(x)), x + FFN(LN(x))] with causal attention, a
final layer norm; items are scored by a dot product with the (shared, unscaled) item embeddings.
Histories are left-padded, so the last column is always the most recent item and carries
position ``max_length``. Padding keys are masked out of attention, so results do not depend on
how much padding a batch has. Trained by the next-item recipe of molar/recipes/id_models.py.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from molar.errors import UserError
from molar.models.id_model import SequentialRecommender, read_checkpoint, write_checkpoint

NAME = "sasrec"  # its registry name, its params.yaml section and its checkpoints' "model"


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class SasrecConfig:
    SECTION: ClassVar[str] = NAME  # the params.yaml section its values come from (named in errors)

    n_items: int
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_length: int = 50

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(
                f"{self.SECTION}.hidden_size ({self.hidden_size}) must be divisible by {self.SECTION}.num_heads ({self.num_heads})"
            )
        if self.n_items < 1:
            raise ValueError(f"SASRec needs a catalog of at least one item (n_items={self.n_items})")


def config_fields(n_items: int, params) -> dict:
    """``SasrecConfig`` fields from a params section with SASRec's keys (``sasrec``, ``sasrec_content``)."""
    return {
        "n_items": n_items,
        "hidden_size": params.hidden_size,
        "num_blocks": params.num_blocks,
        "num_heads": params.num_heads,
        "dropout": params.dropout,
        "max_length": params.max_length,
    }


class _CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = _CausalSelfAttention(d, heads, dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        # the original's point-wise feed-forward: two d x d layers, ReLU, dropout after each
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), allowed)
        return x + self.ffn(self.ffn_norm(x))


class SASRec(SequentialRecommender):
    # what its checkpoints are written and read under (a subclass such as DuoRec names its own)
    CHECKPOINT_NAME: ClassVar[str] = NAME
    CONFIG: ClassVar[type[SasrecConfig]] = SasrecConfig

    def __init__(self, config: SasrecConfig, item_table: bool = True) -> None:
        """``item_table=False``: the encoder without the ID table, for a subclass with its own
        ``input_vectors`` / ``item_embeddings`` (content SASRec, molar/models/content_sasrec.py)."""
        super().__init__()
        self.config = config
        self.n_items, self.max_length = config.n_items, config.max_length
        d = config.hidden_size
        if item_table:
            self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_length + 1, d, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        # as the reference port: Xavier-normal weights, zero biases, padding rows zero
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
            elif "norm" not in name:
                nn.init.zeros_(p)
        with torch.no_grad():
            if item_table:
                self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()

    def input_vectors(self, padded: torch.Tensor) -> torch.Tensor:
        return self.item_emb(padded)

    def encode_vectors(self, inputs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        length = inputs.shape[1]
        if length > self.max_length:
            raise ValueError(f"SASRec: {length} positions > max_length {self.max_length}; truncate with left_pad")
        positions = torch.arange(self.max_length - length + 1, self.max_length + 1, device=inputs.device)
        x = inputs * math.sqrt(self.config.hidden_size)
        x = x + self.pos_emb(positions * real)
        x = self.emb_dropout(x) * real.unsqueeze(-1)
        # query i may see key j <= i that is a real item; every position also sees itself, so
        # padding rows (which no loss or score reads) never have an empty softmax.
        causal = torch.ones(length, length, dtype=torch.bool, device=inputs.device).tril()
        allowed = (causal & real.unsqueeze(1)) | torch.eye(length, dtype=torch.bool, device=inputs.device)
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_params(cls, n_items: int, params) -> "SASRec":  # params: molar.config.SasrecParams
        """A fresh, randomly initialised SASRec (from torch's global RNG) for the ``sasrec`` section."""
        return cls(SasrecConfig(**config_fields(n_items, params)))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (atomically, as a whole)."""
        write_checkpoint(directory, self.CHECKPOINT_NAME, asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SASRec":
        config, weights = read_checkpoint(directory, cls.CHECKPOINT_NAME, device)
        model = cls(cls.CONFIG(**config))
        model.load_state_dict(weights)
        return model.to(device).eval()
