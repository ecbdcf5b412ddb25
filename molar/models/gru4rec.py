"""GRU4Rec (Hidasi et al. 2016) with the improved recipe of Tan et al. 2016: a GRU over item histories.

Tan et al.'s recipe, as RecBole's GRU4Rec implements it: item embeddings (row 0 = padding) ->
dropout -> a ``num_layers`` GRU -> a linear projection from the GRU width back to the embedding
width, trained on every prefix (next-item loss at every position). Items are scored by a dot
product with the same item embeddings that feed the GRU (input and output tied, as RecBole).

Left padding and the recurrence: the padding comes first, so whatever a padding step does to the
hidden state would reach every real item after it. Here it does nothing, exactly: the GRU has no
biases (as RecBole's) and padding inputs are zero, and a bias-free GRU step from h = 0 on x = 0
gives z = r = 1/2 and candidate tanh(0) = 0, so h' = 0 in every layer. The state after any amount
of padding is the initial state, and each user vector is that of the unpadded history.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from molar.models.id_model import SequentialRecommender, read_checkpoint, write_checkpoint

NAME = "gru4rec"  # its registry name, its params.yaml section and its checkpoints' "model"


@dataclass(frozen=True)
class Gru4recConfig:
    """The architecture; no defaults here: they live in one place, molar.config.Gru4recParams."""

    n_items: int
    embedding_size: int  # item embedding width = user vector width
    hidden_size: int  # GRU width
    num_layers: int
    dropout: float  # on the item embeddings
    max_length: int  # history length the model sees (most recent items)

    def __post_init__(self) -> None:
        if self.n_items < 1:
            raise ValueError(f"GRU4Rec needs a catalog of at least one item (n_items={self.n_items})")


class GRU4Rec(SequentialRecommender):
    def __init__(self, config: Gru4recConfig) -> None:
        super().__init__()
        self.config = config
        self.n_items, self.max_length = config.n_items, config.max_length
        self.item_emb = nn.Embedding(config.n_items + 1, config.embedding_size, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        # bias=False keeps padding a no-op (module docstring); RecBole's GRU has none either
        self.gru = nn.GRU(config.embedding_size, config.hidden_size, config.num_layers, bias=False, batch_first=True)
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        # as RecBole: Xavier-uniform embeddings and GRU weights; the padding row stays zero
        nn.init.xavier_uniform_(self.item_emb.weight)
        for weight in self.gru.parameters():
            nn.init.xavier_uniform_(weight)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @classmethod
    def from_params(cls, n_items: int, params) -> "GRU4Rec":  # params: molar.config.Gru4recParams
        return cls(
            Gru4recConfig(
                n_items=n_items,
                embedding_size=params.embedding_size,
                hidden_size=params.hidden_size,
                num_layers=params.num_layers,
                dropout=params.dropout,
                max_length=params.max_length,
            )
        )

    def input_vectors(self, padded: torch.Tensor) -> torch.Tensor:
        return self.item_emb(padded)

    def encode_vectors(self, inputs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        # zero at padding whatever row 0 holds: the no-op argument needs x = 0 there, not a convention
        x = self.emb_dropout(inputs) * real.unsqueeze(-1)
        states, _ = self.gru(x)  # h0 = 0; causal: position i's state has seen items <= i only
        return self.dense(states)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (atomically, as a whole)."""
        write_checkpoint(directory, NAME, asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "GRU4Rec":
        config, weights = read_checkpoint(directory, NAME, device)
        model = cls(Gru4recConfig(**config))
        model.load_state_dict(weights)
        return model.to(device).eval()
