"""Leave-one-out split of data/interim/ into data/processed/ (train / valid / test), with stats."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer

from molar.data.split import build_split
from molar.io import INTERIM, METRICS, PROCESSED, atomic_path, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, require_input, user_errors

STATS = METRICS / "split.json"


def main(params: Path = PARAMS_OPTION) -> None:
    cfg = read_params(params)
    prepare_outputs(PROCESSED, STATS)
    with user_errors():
        items = pl.read_parquet(require_input(INTERIM / "items.parquet", "ingest"))
        interactions = pl.read_parquet(require_input(INTERIM / "interactions.parquet", "ingest"))
        tables, stats = build_split(items, interactions, cfg.split)
    with atomic_path(PROCESSED) as out:
        out.mkdir()
        for name, df in tables.items():
            df.write_parquet(out / f"{name}.parquet")
    write_json(stats, STATS)
    typer.echo(f"split: {stats['users']:,} users, {stats['items']:,} items, {stats['rows_out']:,} interactions -> {PROCESSED}/")
