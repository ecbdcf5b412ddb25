"""SASRec text reader (data.source: sasrec-txt): one ``user item`` pair per line.

The format of the SASRec repository's ``data/*.txt`` (and of ../shared/data/ml-1m/ml-1m.txt): two
whitespace-separated integer ids per line, each user's lines in chronological order. There are no
timestamps: ``timestamp`` is null and ``order`` is the line order within the user. Ids are kept as
the strings in the file.

data.path is the ``.txt`` file, or a folder holding exactly one. Item content is optional, from
beside the file: ``movies.dat`` (MovieLens ml-1m format, see ``movielens``) and ``posters/<id>.jpg``.
Items that ``movies.dat`` does not describe (or all items, without it) get the title "item <id>", an
empty description and no attributes.

The file is read and checked with vectorised polars string operations (about a second for the
1M-line ml-1m.txt); only malformed lines are then walked one by one to report their line numbers.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from molar.config import DataParams
from molar.data.readers.movielens import read_movies_dat
from molar.data.schema import (
    INT_PATTERN,
    BadInputError,
    IngestReport,
    catalog_items,
    drop_bad_lines,
    order_interactions,
    placeholder_item,
    read_lines,
    split_fields,
    validate,
)

EXPECTED_LINE = "two whitespace-separated integer ids 'user item'"


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    file = _sequence_file(path)
    frame = split_fields(read_lines(file, report, cfg.on_bad_line, interaction_rows=True), None, 2)
    ok = pl.col("fields_ok") & pl.col("f0").str.contains(INT_PATTERN) & pl.col("f1").str.contains(INT_PATTERN)
    frame = drop_bad_lines(frame, ok, file, EXPECTED_LINE, report, cfg.on_bad_line)
    interactions = order_interactions(
        frame.select(
            pl.col("f0").alias("user_id"), pl.col("f1").alias("item_id"), pl.lit(None, dtype=pl.Int64).alias("timestamp")
        )
    )

    folder = file.parent
    movies = folder / "movies.dat"
    content = read_movies_dat(movies, cfg, report) if movies.is_file() else {}
    for item_id in interactions["item_id"].unique(maintain_order=True).to_list():
        content.setdefault(item_id, placeholder_item(item_id))
    items = catalog_items(interactions, content, lambda item_id: folder / "posters" / f"{item_id}.jpg", report)
    return validate(items, interactions, "sasrec-txt")


def _sequence_file(path: Path) -> Path:
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.txt"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise BadInputError(
            f"{path}: expected exactly one .txt file of 'user item' lines (found {found}); "
            "point data.path at the file itself"
        )
    return candidates[0]
