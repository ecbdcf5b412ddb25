"""The catalog embedding cache: every item's MIRM embedding, computed once per checkpoint.

File format (safetensors): one tensor ``items`` [n_items + 1, d] float32, row i = item_idx i,
row 0 = zeros (padding), plus string metadata: ``key`` (what the table was computed from, see
``catalog_key``), ``checkpoint`` (directory), ``n_items``, ``hidden_size``.

``cached_catalog_embeddings(path, ...)`` returns the table at ``path`` when its key matches and
computes and writes it (atomically) otherwise, so train-mirm writes it once and evaluation and
the joint stage reuse it. The key covers the checkpoint's files (content hash), the items table,
the prompt settings and the dtype: a new fine-tune or a changed prompt never reuses a stale table.

Under ``accelerate launch`` every process embeds its share of the length-sorted chunks (round
robin, so the work is balanced); the rows are summed across processes (each row is non-zero in
exactly one, so the sum is exact) and the main process writes the file.

``item_content_tables`` computes the content SASRecs' frozen item inputs (molar/item_content.py)
with the same batching: text-only ``[Cur_Item]`` states and the vision tower's image features.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import polars as pl
import torch
from safetensors import safe_open

from molar.backbones import Backbone
from molar.io import checkpoint_key, write_safetensors  # checkpoint_key: re-exported for the stages
from molar.models.mirm import (
    PromptEncoder,
    cur_item_states,
    embed_items,
    image_state_width,
    image_states,
    item_chunks,
    item_texts,
    make_encoder,
)
from molar.train import process_state

TENSOR = "items"


def catalog_key(checkpoint: str, items: pl.DataFrame, encoder: PromptEncoder, dtype: str) -> str:
    """Key of a catalog table: checkpoint hash, the items' content, prompt settings, dtype."""
    h = hashlib.sha256()
    h.update(checkpoint.encode())
    for column in ("title", "description", "attributes", "image_path"):
        h.update(json.dumps(items[column].to_list()).encode())
    settings = {
        "lines": encoder.lines,
        "text": encoder.use_text,
        "image": encoder.use_image,
        "max_text_tokens": encoder.max_text_tokens,
        "pixels": dict(encoder.backbone.image_processor.size) if encoder.backbone.image_processor is not None else None,
        "dtype": dtype,
    }
    if encoder.backbone.image_features is not None:  # frozen features: which extractor made them
        settings["image_encoder"] = encoder.backbone.image_features.identity
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def embed_catalog(
    backbone: Backbone, encoder: PromptEncoder, items: pl.DataFrame, batch_size: int, states=cur_item_states,
    width: int | None = None,
) -> torch.Tensor:
    """[n_items + 1, d] float32 (row 0 zeros) on CPU; sharded across processes when several run.

    ``states``, ``width``: what each item's vector is and its width (``molar.models.mirm.embed_items``; default its
    ``[Cur_Item]`` state)."""
    state = process_state()
    texts = item_texts(items)
    chunks = item_chunks(encoder, texts, batch_size)
    rows = embed_items(
        backbone, encoder, texts, batch_size, chunks=chunks[state.process_index :: state.num_processes], states=states,
        width=width,
    )
    if state.num_processes > 1:
        rows = rows.to(state.device)
        torch.distributed.all_reduce(rows, op=torch.distributed.ReduceOp.SUM)
        rows = rows.cpu()
    return torch.cat([torch.zeros(1, rows.shape[1]), rows])


def save_catalog_embeddings(path: str | Path, table: torch.Tensor, key: str, checkpoint: str | Path) -> None:
    """Write the table (format in the module docstring) atomically, byte-identical for equal inputs."""
    metadata = {"key": key, "checkpoint": str(checkpoint), "n_items": str(table.shape[0] - 1), "hidden_size": str(table.shape[1])}
    write_safetensors({TENSOR: table}, path, metadata)


def load_catalog_embeddings(path: str | Path, key: str | None = None) -> torch.Tensor | None:
    """The table at ``path``; None when missing or (with ``key``) computed from something else."""
    path = Path(path)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        if key is not None and (f.metadata() or {}).get("key") != key:
            return None
        return f.get_tensor(TENSOR)


def cached_catalog_embeddings(
    path: str | Path,
    backbone: Backbone,
    encoder: PromptEncoder,
    items: pl.DataFrame,
    batch_size: int,
    dtype: str,
    checkpoint: str | None = None,
) -> torch.Tensor:
    """Load the table at ``path`` if it was computed from the same inputs, else compute and write it.

    ``checkpoint``: its content hash if the caller has it (else hashed from ``backbone.directory``;
    pass your own when the in-memory weights differ from the directory's).
    """
    state = process_state()
    key = catalog_key(checkpoint or checkpoint_key(backbone.directory), items, encoder, dtype)
    table = load_catalog_embeddings(path, key)
    if table is not None:
        return table
    table = embed_catalog(backbone, encoder, items, batch_size)
    if state.is_main_process:
        save_catalog_embeddings(path, table, key, backbone.directory)
    state.wait_for_everyone()
    return table


def item_content_tables(backbone: Backbone, mirm, source: str, items: pl.DataFrame) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tables of the item-content file (molar/item_content.py) for ``items``, and why there is no
    ``image`` table (None when there is one).

    ``text``: each item's ``[Cur_Item]`` state over its text-only prompt (MIRM's item embedding with
    ``mirm.modalities: [text]``; the state that reads the whole prompt, where a mean over a causal
    LM's token states would weigh the first tokens most). ``image``: the vision tower's features of
    each item's image (``image_features``, mean-pooled), zero for an item without one; present when
    the backbone has an image side and an item has an image. ``mirm``: the ``MirmParams`` (prompt
    of ``source``, text budget, pixel budget via the backbone, batch size).
    """
    text = make_encoder(backbone, mirm.model_copy(update={"modalities": ["text"]}), source)
    tables = {"text": embed_catalog(backbone, text, items, mirm.embed_batch_size)}
    if not backbone.supports_images:
        if getattr(backbone.model.config, "image_feature_dim", None):  # opened without its image encoder
            return tables, f"mirm.backbone {mirm.backbone} reads image features, but mirm.image_encoder is not set"
        return tables, f"mirm.backbone {mirm.backbone} has no image side"
    if items["image_path"].is_null().all():
        return tables, "no item has an image"
    image = make_encoder(backbone, mirm.model_copy(update={"modalities": ["image"]}), source)
    tables["image"] = embed_catalog(backbone, image, items, mirm.embed_batch_size, states=image_states,
                                    width=image_state_width(backbone.model))
    return tables, None
