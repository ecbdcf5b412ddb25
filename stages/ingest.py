"""Read the raw data (data.source, data.path) into data/interim/ and report what was kept."""

from __future__ import annotations

from pathlib import Path

import typer

from molar.data.ingest import ingest
from molar.io import INTERIM, METRICS, atomic_path, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, user_errors

REPORT = METRICS / "ingest.json"


def main(params: Path = PARAMS_OPTION) -> None:
    cfg = read_params(params)
    prepare_outputs(INTERIM, REPORT)
    with user_errors(), atomic_path(INTERIM) as out:
        out.mkdir()
        items, interactions, report = ingest(cfg, out / "images", INTERIM / "images")
        items.write_parquet(out / "items.parquet")
        interactions.write_parquet(out / "interactions.parquet")
    write_json(report, REPORT)
    typer.echo(
        f"ingest ({cfg.data.source}): {report['rows_kept']:,} interactions, {report['items']:,} items "
        f"({report['items_with_image']:,} with image) -> {INTERIM}/"
    )
