"""Late ID fusion (issue 13): an ensemble of two frozen scorers, e.g. ``molar+sasrec``.

The paper's Figure 1 contrasts fusing ID knowledge early (``dueg.item_id_embedding``), after
alignment (Molar's ``align.alpha``) and late, at the score. The late one is this ensemble:

    score(u, i) = z_A(u, i) + w * z_B(u, i),    z_X(u, .) = (s_X(u, .) - mean_u) / std_u

with ``mean_u`` / ``std_u`` over the catalog items 1..n of user u's row (column 0, padding, is
left at 0 and never ranked). Why standardise: Molar scores are ``logit_scale x cos`` (within
+-10), SASRec's are raw dot products of any scale, and both scales differ from user to user; per
user, mean 0 / std 1 makes ``w`` the relative weight of the two rankings' spreads, the same for
every user and comparable across datasets, so one fixed grid (``late_fusion.weights``) fits. A
row with no spread (std 0) contributes zeros. ``w`` is chosen on the validation split (largest
NDCG@10, the smallest w on a tie, so w = 0 is Molar alone; molar/recipes/late_fusion.py); the
components stay frozen. Metric tables name it ``molar+sasrec``: an ensemble of two models, not
a third model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from molar.errors import MissingInputError, UserError
from molar.io import atomic_path

CONFIG_FILE = "config.json"
ScoreFn = Callable[[list[list[int]]], torch.Tensor]


def components_of(name: str) -> tuple[str, str]:
    """``"molar+sasrec"`` -> ``("molar", "sasrec")``: the base model and the one added with weight w."""
    parts = tuple(name.split("+"))
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"a late-fusion ensemble is named BASE+ADDED, got {name!r}")
    return parts  # type: ignore[return-value]


def standardise(scores: torch.Tensor) -> torch.Tensor:
    """Per row, items 1..n to mean 0 / std 1 (population std); column 0 (padding) set to 0."""
    items = scores[:, 1:].float()
    mean = items.mean(dim=1, keepdim=True)
    std = items.std(dim=1, keepdim=True, unbiased=False)
    z = torch.where(std > 0, (items - mean) / std.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(items))
    return torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)


def fuse(base: ScoreFn, added: ScoreFn, weight: float) -> ScoreFn:
    """``score_fn(histories)``: ``standardise(base) + weight x standardise(added)`` [B, n_items + 1]."""
    if weight < 0:
        raise ValueError(f"the late-fusion weight must be >= 0, got {weight}")

    def score_fn(histories: list[list[int]]) -> torch.Tensor:
        z = standardise(base(histories))
        return z if weight == 0 else z + weight * standardise(added(histories))

    return score_fn


@dataclass(frozen=True)
class LateFusionConfig:
    components: tuple[str, str]  # (base, added): score = z(base) + weight x z(added)
    weight: float  # the chosen w
    valid_ndcg: dict[str, float] = field(default_factory=dict)  # w (as text) -> validation NDCG@10, the grid searched
    component_keys: dict[str, str] = field(default_factory=dict)  # component -> content hash of its checkpoint when fitted

    def save(self, directory: str | Path) -> None:
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            meta = {"model": "late_fusion", **asdict(self), "components": list(self.components)}
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "LateFusionConfig":
        path = Path(directory) / CONFIG_FILE
        if not path.exists():
            raise MissingInputError(f"{path}: no late-fusion ensemble; run `molar train-late-fusion` first")
        meta = json.loads(path.read_text())
        if meta.get("model") != "late_fusion":
            raise UserError(f"{path}: not a late-fusion ensemble")
        return cls(tuple(meta["components"]), float(meta["weight"]), meta["valid_ndcg"], meta["component_keys"])
