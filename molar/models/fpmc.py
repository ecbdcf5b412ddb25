"""FPMC (Rendle et al. 2010): matrix factorisation + a first-order Markov chain over items.

FPMC scores item j for user u whose last item is l as ``<UI_u, IU_j> + <LI_l, IL_j>``: a
user-item term (long-term taste) plus an item-to-item transition term (RecBole's sequential
FPMC, baskets of one item). One difference, because every model here maps a history to the
next item and takes no user id:

**History-only variant.** The free user factor ``UI_u`` is replaced by a pooled factor of the
history so far, the mean of a history table's rows over the items at positions <= t (FISM-style,
padding masked out). The model thus recommends to users it never saw, and position t sees only
items <= t (causal), as the interface requires. The transition term is FPMC's, from the item at
position t.

The two inner products become one dot product by concatenation: the user vector after position t
is ``[mean_{s<=t} H_{i_s} ; LI_{i_t}]`` and item j's vector is ``[IU_j ; IL_j]``, each factor
``hidden_size / 2`` wide, so ``d = hidden_size`` as for every ID model. Row 0 of every table is
padding (zero, never trained, never recommended).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from molar.errors import UserError
from molar.models.id_model import SequentialRecommender, read_checkpoint, write_checkpoint

NAME = "fpmc"  # its registry name, its params.yaml section and its checkpoints' "model"


@dataclass(frozen=True)
class FpmcConfig:
    n_items: int
    hidden_size: int = 128  # two factors of 64: RecBole's FPMC embedding_size
    dropout: float = 0.0  # RecBole's FPMC has none
    max_length: int = 50

    def __post_init__(self) -> None:
        if self.hidden_size < 2 or self.hidden_size % 2:
            raise UserError(f"fpmc.hidden_size ({self.hidden_size}) must be even: it holds two factors of hidden_size / 2")
        if self.n_items < 1:
            raise ValueError(f"FPMC needs a catalog of at least one item (n_items={self.n_items})")


class FPMC(SequentialRecommender):
    def __init__(self, config: FpmcConfig) -> None:
        super().__init__()
        self.config = config
        self.n_items, self.max_length = config.n_items, config.max_length
        n, f = config.n_items + 1, config.hidden_size // 2
        self.history_emb = nn.Embedding(n, f, padding_idx=0)  # H: pooled into the user factor (stands for UI_u)
        self.item_user_emb = nn.Embedding(n, f, padding_idx=0)  # IU: the item side of the user-item term
        self.last_item_emb = nn.Embedding(n, f, padding_idx=0)  # LI: the last item's side of the transition term
        self.item_last_emb = nn.Embedding(n, f, padding_idx=0)  # IL: the next item's side of the transition term
        self.dropout = nn.Dropout(config.dropout)
        # as RecBole's FPMC: Xavier-normal factors; padding rows zero (nn.Embedding keeps them so)
        for table in (self.history_emb, self.item_user_emb, self.last_item_emb, self.item_last_emb):
            nn.init.xavier_normal_(table.weight)
            with torch.no_grad():
                table.weight[0].zero_()

    @classmethod
    def from_params(cls, n_items: int, params) -> "FPMC":  # params: molar.config.FpmcParams
        return cls(FpmcConfig(n_items=n_items, hidden_size=params.hidden_size, dropout=params.dropout, max_length=params.max_length))

    def input_vectors(self, padded: torch.Tensor) -> torch.Tensor:
        """[H_i ; LI_i] per position: the history factor and the transition factor side by side."""
        return torch.cat([self.history_emb(padded), self.last_item_emb(padded)], dim=-1)

    def encode_vectors(self, inputs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        real = real.unsqueeze(-1)  # [B, L, 1]
        f = inputs.shape[-1] // 2
        # padding inputs are zero (the caller's masking below keeps them so for any inputs) and
        # dropout keeps zeros zero, so the running sum over left padding adds exact zeros: more
        # padding never changes a real position's vector
        inputs = inputs * real
        history = self.dropout(inputs[..., :f]).cumsum(dim=1)
        seen = real.cumsum(dim=1).clamp(min=1)  # items so far; padding positions divide 0 by 1
        pooled = history / seen
        last = self.dropout(inputs[..., f:])
        return torch.cat([pooled, last], dim=-1) * real

    def item_embeddings(self) -> torch.Tensor:
        return torch.cat([self.item_user_emb.weight, self.item_last_emb.weight], dim=-1)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (atomically, as a whole)."""
        write_checkpoint(directory, NAME, asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "FPMC":
        config, weights = read_checkpoint(directory, NAME, device)
        model = cls(FpmcConfig(**config))
        model.load_state_dict(weights)
        return model.to(device).eval()
