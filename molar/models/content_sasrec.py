"""Content SASRec (the Molar paper's SASRec_Bert / SASRec_Vit / SASRec_Bert+Vit baselines).

SASRec (molar/models/sasrec.py, its encoder reused as is) whose items are not rows of a learned
ID table but a learned projection of each item's frozen content vectors (molar/item_content.py:
the MIRM backbone's text state of the item, the vision tower's features of its image, or both
concatenated): item i is ``projection(whitening(content[i]))`` on the input side and, tied as
SASRec ties them, on the scoring side (row 0 = padding = zero).

- ``content`` is a buffer: never trained (no gradient reaches it), saved in the checkpoint, so
  ``from_pretrained`` needs nothing but the checkpoint folder.
- ``whitening``: fixed ZCA whitening with the catalog's statistics (molar/models/whitening.py).
  LLM states share one dominant direction (mean pairwise cosine 0.999 for the tiny preset's text
  states, 0.997 for its image features); unwhitened, the projection never gets past it (valid
  NDCG@10 of sasrec-text on the embedded default 0.06, below popularity's 0.09; 0.42 whitened).
- The whitened catalog is computed once and reused while ``content`` and the whitening buffers
  stay as they are (same storage, no in-place change, same autocast): a catalog-wide matrix product
  per call was most of a step's cost for the wide image features.
- ``projection``: Linear -> GELU -> Linear (content width -> hidden -> hidden). A linear map ties
  every item vector to a fixed linear function of its content, so items whose content differs
  little stay close whatever the data says: whitened but linear, sasrec-text stays at 0.07.

One class per modality set, each its own registry name: ``sasrec-text``, ``sasrec-image``,
``sasrec-text-image``; all read the params section ``sasrec_content`` (SASRec's keys,
molar/models/registry.py:SECTIONS). Trained by the next-item recipe of molar/recipes/id_models.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from molar.item_content import ITEM_CONTENT, read_item_content
from molar.models.id_model import read_checkpoint, write_checkpoint
from molar.models.sasrec import SASRec, SasrecConfig, config_fields
from molar.models.whitening import ItemWhitening


@dataclass(frozen=True)
class ContentSasrecConfig(SasrecConfig):
    content_dim: int = 1  # width of the frozen content vectors (the modalities' widths summed)


class ContentSASRec(SASRec):
    """SASRec over ``projection(whitening(content[item]))``; a subclass names the modalities."""

    NAME: ClassVar[str]  # registry name, checkpoints' "model"
    MODALITIES: ClassVar[tuple[str, ...]]  # tables of the item-content file, concatenated in this order

    def __init__(self, config: ContentSasrecConfig, content: torch.Tensor | None = None) -> None:
        """``content`` [n_items + 1, content_dim] (row 0 padding); None: zeros, for a checkpoint to fill."""
        super().__init__(config, item_table=False)
        rows, width = config.n_items + 1, config.content_dim
        if content is not None and tuple(content.shape) != (rows, width):
            raise ValueError(f"{self.NAME}: content of shape {tuple(content.shape)}, expected [{rows}, {width}]")
        table = torch.zeros(rows, width) if content is None else content.detach().float().clone()
        table[0] = 0
        self.register_buffer("content", table)
        self.whitening = ItemWhitening(width, None if content is None else table[1:])
        self._whitened: tuple[tuple, torch.Tensor] | None = None  # (what it was computed from, whitened catalog)
        d = config.hidden_size
        self.projection = nn.Sequential(nn.Linear(width, d), nn.GELU(), nn.Linear(d, d))
        for layer in (self.projection[0], self.projection[2]):  # as SASRec's own weights
            nn.init.xavier_normal_(layer.weight)
            nn.init.zeros_(layer.bias)

    def input_vectors(self, padded: torch.Tensor) -> torch.Tensor:
        # the catalog once rather than every position of the batch: fewer rows on the catalogs we
        # train on (240 items on the embedded default, 3,706 on ML-1M, against batch x length)
        return self.item_embeddings()[padded]

    def whitened_content(self) -> torch.Tensor:
        """whitening(content[1:]), recomputed only when its inputs or the autocast context changed."""
        sources = (self.content, self.whitening.mean, self.whitening.matrix)
        device = self.content.device.type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        key = (*((t.data_ptr(), t._version) for t in sources), autocast)
        if self._whitened is None or self._whitened[0] != key:
            with torch.no_grad():  # fixed buffers: nothing to differentiate
                self._whitened = (key, self.whitening(self.content[1:]))
        return self._whitened[1]

    def item_embeddings(self) -> torch.Tensor:
        items = self.projection(self.whitened_content())
        return torch.cat([items.new_zeros(1, items.shape[1]), items])

    # ------------------------------------------------------------------ persistence
    @classmethod
    def from_content(cls, content: torch.Tensor, params) -> ContentSASRec:  # params: molar.config.SasrecContentParams
        """A fresh model (random init from torch's global RNG) over ``content`` [n_items + 1, d], row 0 padding."""
        fields = config_fields(content.shape[0] - 1, params)
        return cls(ContentSasrecConfig(**fields, content_dim=content.shape[1]), content)

    @classmethod
    def from_params(cls, n_items: int, params, content_path: str | Path = ITEM_CONTENT) -> ContentSASRec:
        """A fresh model over an item-content file (``molar item-content``'s output unless ``content_path``
        names another file of its format) for the ``sasrec_content`` section."""
        return cls.from_content(read_item_content(content_path, cls.MODALITIES, n_items), params)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` (content table included) into ``directory``, atomically."""
        write_checkpoint(directory, self.NAME, asdict(self.config), self)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ContentSASRec:
        config, weights = read_checkpoint(directory, cls.NAME, device)
        model = cls(ContentSasrecConfig(**config))
        model.load_state_dict(weights)
        return model.to(device).eval()


class SasrecText(ContentSASRec):
    """SASRec_Bert's place: the MIRM backbone's text state of each item."""

    NAME, MODALITIES = "sasrec-text", ("text",)


class SasrecImage(ContentSASRec):
    """SASRec_Vit's place: the vision tower's features of each item's image (zero for items without one)."""

    NAME, MODALITIES = "sasrec-image", ("image",)


class SasrecTextImage(ContentSASRec):
    """SASRec_Bert+Vit's place: both, concatenated."""

    NAME, MODALITIES = "sasrec-text-image", ("text", "image")
