"""DuoRec (Qiu et al., WSDM 2022): SASRec with a contrastive regulariser of the sequence representation.

The reference is RecBole's DuoRec (the authors' code, RuihongQiu/DuoRec: model/sequential_recommender/
duorec.py, properties/model/DuoRec.yaml, duorec.sh); the defaults of molar.config.DuorecParams are
its own unless a comment there says otherwise. The encoder is this project's SASRec
(molar/models/sasrec.py, subclassed: the same blocks and scores, so at inference DuoRec is a SASRec).
RecBole's encoder is a post-LN BERT block with GELU and a 4x feed-forward, ours the pre-LN blocks of
the reference SASRec port, so that DuoRec against our SASRec measures the regulariser alone.

The sequence representation is the encoder output at the last position (the one that predicts the
row's last target). ``auxiliary_loss`` adds ``lambda_ * in_batch_info_nce(A, B)`` (molar/losses.py:
RecBole's ``info_nce``, 2N views, in-batch negatives) to the next-item loss, with ``contrast``:

- ``us_x`` (RecBole's DuoRec): A = a second pass of the row's input (another dropout mask), B = the
  pass of a same-target partner (``NextItemBatch.partners``: another training prefix followed by
  the row's last target, RecBole's "semantic augmentation");
- ``un``: A = the pass the next-item loss reads, B = a second pass of the same input (two dropout views);
- ``su``: A = the pass the next-item loss reads, B = the partner's pass.

RecBole weighs ``un`` by ``lmd`` and ``su`` / ``us_x`` by ``lmd_sem``, both 0.1 by default; here one
``lambda_`` weighs whichever term ``contrast`` selects.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Literal

import torch

from molar.losses import in_batch_info_nce
from molar.models.id_model import NextItemBatch
from molar.models.sasrec import SASRec, SasrecConfig

NAME = "duorec"  # its registry name, its params.yaml section and its checkpoints' "model"
PARTNER_CONTRASTS = ("us_x", "su")  # the contrasts whose view B is a same-target partner


@dataclass(frozen=True, kw_only=True)
class DuorecConfig(SasrecConfig):
    """SASRec's architecture + the contrastive term; no defaults here: they live in molar.config.DuorecParams."""

    SECTION: ClassVar[str] = NAME

    contrast: Literal["us_x", "un", "su"]
    lambda_: float  # weight of the contrastive term (params.yaml: duorec.lambda)
    tau: float  # InfoNCE temperature
    similarity: Literal["dot", "cosine"]


class DuoRec(SASRec):
    CHECKPOINT_NAME = NAME
    CONFIG = DuorecConfig
    config: DuorecConfig

    def __init__(self, config: DuorecConfig) -> None:
        super().__init__(config)
        self.same_target_partners = config.contrast in PARTNER_CONTRASTS

    @classmethod
    def from_params(cls, n_items: int, params) -> "DuoRec":  # params: molar.config.DuorecParams
        """A fresh, randomly initialised DuoRec (from torch's global RNG) for the ``duorec`` section."""
        keys = [f.name for f in fields(DuorecConfig) if f.name != "n_items"]  # the section names them alike
        return cls(DuorecConfig(n_items=n_items, **{k: getattr(params, k) for k in keys}))

    def auxiliary_loss(self, batch: NextItemBatch, states: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """``lambda_`` x the InfoNCE of the two views ``contrast`` names (module docstring), at the last position."""
        c = self.config
        if self.same_target_partners and batch.partners is None:
            raise ValueError(f"DuoRec (contrast {c.contrast}) needs same-target partners in the batch (NextItemBatch.partners)")
        if c.contrast == "us_x":
            a, b = self(batch.inputs)[:, -1], self(batch.partners)[:, -1]
        elif c.contrast == "su":
            a, b = states[:, -1], self(batch.partners)[:, -1]
        else:  # un
            a, b = states[:, -1], self(batch.inputs)[:, -1]
        term = in_batch_info_nce(a, b, c.tau, c.similarity)
        return c.lambda_ * term, {"contrastive_loss": term.item()}
