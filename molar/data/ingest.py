"""Ingest: run the configured reader and tidy its tables into the interim schema."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from molar.config import Params
from molar.data.readers import reader_module, resolve_path
from molar.data.schema import IngestReport, validate


def ingest(params: Params, image_dir: Path, recorded_image_dir: Path) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """Read ``params.data`` into (items, interactions, report dict).

    Generated images (synthetic source) are written to ``image_dir`` and recorded as lying in
    ``recorded_image_dir``, their place once the stage's output folder is renamed into place.
    Interactions whose item is not in the item table are dropped (counted as ``unknown_item``);
    rows repeating a (user, item, timestamp) already seen are dropped as ``duplicate``.
    """
    cfg = params.data
    report = IngestReport(source=cfg.source)
    module = reader_module(cfg.source)
    if cfg.source == "synthetic":
        items, interactions = module.generate(cfg, params.seed, image_dir, report, recorded_image_dir)
    else:
        items, interactions = module.read(resolve_path(cfg.source, cfg.path), cfg, report)
    items, interactions = validate(items, interactions, cfg.source, report)

    known = interactions["item_id"].is_in(items["item_id"].implode())
    report.dropped["unknown_item"] += int((~known).sum())
    interactions = interactions.filter(known)
    before = interactions.height
    # a repeated (user, item, time) row is a duplicate record; without a timestamp a repeat is
    # a real re-consumption and stays.
    repeated = interactions.select(
        pl.struct("user_id", "item_id", "timestamp").is_first_distinct().not_() & pl.col("timestamp").is_not_null()
    ).to_series()
    interactions = interactions.filter(~repeated)
    report.dropped["duplicate"] += before - interactions.height
    report.dropped = +report.dropped  # drop zero counts
    items, interactions = validate(items, interactions, cfg.source, report)
    return items, interactions, report.as_dict(items.height, interactions.height)
