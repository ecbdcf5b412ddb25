"""SASRec text reader (data.source: sasrec-txt): one ``user item`` pair per line.

The format of the SASRec repository's ``data/*.txt`` (and of ../shared/data/ml-1m/ml-1m.txt): two
whitespace-separated integer ids per line, each user's lines in chronological order. There are no
timestamps: ``timestamp`` is null and ``order`` is the line order within the user. Ids are kept as
the strings in the file. A file where most lines have more than two fields is one line per user
(``user item item ...``): it is rejected with the advice to use data.source: user-seq.

data.path is the ``.txt`` file, or a folder holding exactly one. Item content is optional, from
beside the file: ``movies.dat`` (MovieLens ml-1m format, see ``movielens``) and ``posters/<id>.jpg``.
Items that ``movies.dat`` does not describe (or all items, without it) get the title "item <id>", an
empty description and no attributes; interactions of an item whose ``movies.dat`` line was skipped
(data.on_bad_line: skip) are dropped as ``item_line_skipped``.

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
    drop_items_of_skipped_lines,
    order_interactions,
    placeholder_item,
    read_lines,
    split_fields,
    validate,
)

EXPECTED_LINE = (
    "two whitespace-separated integer ids 'user item' (a file of one line per user, 'user item item ...', "
    "is read by data.source: user-seq)"
)


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    file = sequence_file(path, "'user item' lines")
    lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
    _reject_user_per_line(lines, file)
    frame = split_fields(lines, None, 2)
    ok = pl.col("fields_ok") & pl.col("f0").str.contains(INT_PATTERN) & pl.col("f1").str.contains(INT_PATTERN)
    frame = drop_bad_lines(frame, ok, file, EXPECTED_LINE, report, cfg.on_bad_line)
    interactions = order_interactions(
        frame.select(
            pl.col("f0").alias("user_id"), pl.col("f1").alias("item_id"), pl.lit(None, dtype=pl.Int64).alias("timestamp")
        )
    )

    return movie_items(interactions, file.parent, cfg, report, "sasrec-txt")


def _reject_user_per_line(lines: pl.DataFrame, file: Path) -> None:
    """Stop early, whatever data.on_bad_line, when most lines hold more than two fields: skipping them
    would drop nearly all the data, and the file is almost surely one line per user."""
    n_fields = pl.col("line").str.count_matches(r"\S+")
    long = lines.filter(n_fields > 2)
    if lines.height and long.height * 2 > lines.height:
        line_no, line = long.row(0)
        raise BadInputError(
            f"{file}: {long.height:,} of {lines.height:,} lines have more than two fields (line {line_no}: "
            f"{line.strip()[:80]!r}); this looks like the one-line-per-user format 'user item item ...': "
            "set data.source: user-seq"
        )


def movie_items(
    interactions: pl.DataFrame, folder: Path, cfg: DataParams, report: IngestReport, source: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Items from the optional ``movies.dat`` and ``posters/`` in ``folder``; placeholders for the rest.

    Then (items, interactions) validated. Interactions of an item whose movies.dat line was skipped
    are dropped (``item_line_skipped``) rather than given a placeholder."""
    movies = folder / "movies.dat"
    content = read_movies_dat(movies, cfg, report) if movies.is_file() else {}
    interactions = drop_items_of_skipped_lines(interactions, content, report)
    for item_id in interactions["item_id"].unique(maintain_order=True).to_list():
        content.setdefault(item_id, placeholder_item(item_id))
    items = catalog_items(interactions, content, lambda item_id: folder / "posters" / f"{item_id}.jpg", report)
    return validate(items, interactions, source, report)


def sequence_file(path: Path, what: str) -> Path:
    """data.path itself when it is a file, else the only ``.txt`` file in that folder."""
    if path.is_file():
        return path
    candidates = sorted(path.glob("*.txt"))
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise BadInputError(
            f"{path}: expected exactly one .txt file of {what} (found {found}); point data.path at the file itself"
        )
    return candidates[0]
