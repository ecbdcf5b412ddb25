"""Embed every item's content with the MIRM checkpoint, for the content SASRecs (sasrec-text, sasrec-image, sasrec-text-image).

Writes data/models/item-content.safetensors (format: molar/item_content.py): ``text``, each item's
[Cur_Item] state over its text-only prompt, and ``image``, the vision tower's features of each
item's image, mean-pooled (a zero row for an item without an image; no ``image`` table when the
backbone is text-only or no item has an image), both from data/models/mirm/ (train-mirm), with
the prompts and budgets of mirm.*. metrics/item-content.json counts the items with each.
Runs under `accelerate launch` as is: the catalog is sharded across processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl
import typer

from molar.io import METRICS, PROCESSED, write_json
from stages.common import (
    PARAMS_OPTION,
    prepare_outputs,
    read_params,
    require_input,
    use_threads,
    user_errors,
)
from stages.train_mirm import MIRM_DIR

RECORD = METRICS / "item-content.json"


def image_side(kind: str, image_encoder: str | None) -> tuple[str, ...]:
    """The modalities to open the MIRM checkpoint with: images too wherever it can read them, whatever
    ``mirm.modalities`` (the content SASRecs' image table does not depend on how MIRM was trained). A
    checkpoint over frozen image features (``kind`` ``image-features``) reads them through ``mirm.image_encoder``."""
    if kind == "qwen2-vl" or (kind == "image-features" and image_encoder is not None):
        return ("text", "image")
    return ("text",)


def main(params: Path = PARAMS_OPTION) -> None:
    # torch/transformers load here, not at import: `molar --help` stays fast
    from molar.backbones import checkpoint_kind, load_backbone, mirm_load_options
    from molar.embed_cache import checkpoint_key, item_content_tables
    from molar.item_content import ITEM_CONTENT, save_item_content
    from molar.train import process_state

    started = time.perf_counter()
    cfg = read_params(params)
    prepare_outputs(ITEM_CONTENT, RECORD)
    threads, mirm, state = use_threads(cfg), cfg.mirm, process_state()
    with user_errors():
        items = pl.read_parquet(require_input(PROCESSED / "items.parquet", "split")).sort("item_idx")  # row i: item i
        mirm_dir = require_input(MIRM_DIR, "train-mirm")
        backbone = load_backbone(
            mirm_dir,
            modalities=image_side(checkpoint_kind(mirm_dir), mirm.image_encoder),
            dtype=mirm.dtype,
            device=state.device,
            **mirm_load_options(mirm),
        )
        tables, why_no_image = item_content_tables(backbone, mirm, cfg.data.source, items)
    if not state.is_main_process:  # a multi-process run: one process writes the outputs
        state.wait_for_everyone()
        return
    checkpoint = checkpoint_key(MIRM_DIR)
    metadata = {"n_items": str(items.height), "checkpoint": f"{MIRM_DIR} sha256 {checkpoint}"}
    if why_no_image is not None:
        metadata["why_no_image"] = why_no_image
    save_item_content(ITEM_CONTENT, tables, metadata)
    with_image = int(items["image_path"].is_not_null().sum()) if "image" in tables else 0
    write_json(
        {
            "n_items": items.height,
            "mirm_checkpoint_sha256": checkpoint,
            "widths": {name: int(table.shape[1]) for name, table in tables.items()},
            "items_with_image": with_image,
            "items_without_image": items.height - with_image,  # their image rows are zero
            "why_no_image": why_no_image,
            "threads": threads,  # results are bit-identical for one thread count only
            "seconds": round(time.perf_counter() - started, 1),
        },
        RECORD,
    )
    typer.echo(
        f"item-content: {items.height:,} items, "
        + ", ".join(f"{name} [{table.shape[1]}]" for name, table in tables.items())
        + f" ({items.height - with_image:,} without an image) -> {ITEM_CONTENT}"
    )
    state.wait_for_everyone()
