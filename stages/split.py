"""Leave-one-out split of data/interim/ into data/processed/ (train / valid / test), with stats."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import typer

from molar.data.split import build_split
from molar.io import INTERIM, METRICS, PROCESSED, atomic_path, write_json
from stages.common import PARAMS_OPTION, read_params, user_errors


def main(params: Path = PARAMS_OPTION) -> None:
    cfg = read_params(params)
    with user_errors():
        items = pl.read_parquet(INTERIM / "items.parquet")
        interactions = pl.read_parquet(INTERIM / "interactions.parquet")
        tables, stats = build_split(items, interactions, cfg.split)
    with atomic_path(PROCESSED) as out:
        out.mkdir()
        for name, df in tables.items():
            df.write_parquet(out / f"{name}.parquet")
    write_json(stats, METRICS / "split.json")
    typer.echo(f"split: {stats['users']:,} users, {stats['items']:,} items, {stats['rows_out']:,} interactions -> {PROCESSED}/")
