"""The item-content file: every item's frozen content vectors, one table per modality.

Written by ``molar item-content`` (stages/item_content.py, from the MIRM checkpoint) and read by
the content SASRec models (molar/models/content_sasrec.py). Format (safetensors): tensors
``text`` [n_items + 1, d_text] and, when the backbone has an image side and an item has an
image, ``image`` [n_items + 1, d_image], float32, row i = item_idx i, row 0 = zeros (padding);
an item without an image has a zero ``image`` row. String metadata: ``n_items``, ``checkpoint``
(what the vectors were computed from), ``why_no_image`` where there is no ``image`` tensor.

A file of this format from elsewhere (e.g. frozen BERT / ViT features, as the SASRec_Bert /
SASRec_Vit baselines use) works the same once written to ``ITEM_CONTENT``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from molar.errors import MissingInputError, UserError
from molar.io import MODELS, write_safetensors

ITEM_CONTENT = MODELS / "item-content.safetensors"
MODALITIES = ("text", "image")


def save_item_content(path: str | Path, tables: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write the tables (``text`` and optionally ``image``, each [n_items + 1, d]) atomically, byte-reproducibly."""
    unknown = set(tables) - set(MODALITIES)
    rows = {t.shape[0] for t in tables.values()}
    if unknown or "text" not in tables or len(rows) != 1:
        raise ValueError(f"item content needs a text table and optionally an image one, all of one height; got {sorted(tables)} of heights {sorted(rows)}")
    write_safetensors({name: t.float() for name, t in tables.items()}, path, metadata)


def read_item_content(path: str | Path, modalities: Sequence[str], n_items: int) -> torch.Tensor:
    """[n_items + 1, sum of widths]: the tables of ``modalities`` concatenated in that order, row 0 zero."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise MissingInputError(f"{path}: missing; run `molar item-content` first (or `dvc repro`)")
    with safe_open(str(path), framework="pt") as f:
        present, metadata = set(f.keys()), f.metadata() or {}
        missing = [m for m in modalities if m not in present]
        if missing:
            why = metadata.get("why_no_image", "it was written without one")
            raise UserError(
                f"{path}: no {' or '.join(missing)} vectors ({why}); train a content SASRec over what it has "
                f"({', '.join(f'sasrec-{m}' for m in MODALITIES if m in present)})"
            )
        tables = [f.get_tensor(m).float() for m in modalities]
    for m, table in zip(modalities, tables):
        if table.dim() != 2 or table.shape[0] != n_items + 1:
            raise UserError(
                f"{path}: {m} table of shape {tuple(table.shape)}, but the split has {n_items} items "
                f"(needs [{n_items + 1}, d]); rerun `molar item-content` after `molar split`"
            )
    return torch.cat(tables, dim=1)
