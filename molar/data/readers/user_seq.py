"""One-line-per-user reader (data.source: user-seq): ``user item item item ...``.

The format of the preprocessed sets of S3-Rec, ICLRec, CoSeRec, DuoRec and many LLM-recommendation
repositories (e.g. S3-Rec's ``data/Beauty.txt``): one line per user, the user id and then that
user's items in chronological order, separated by whitespace. Ids may be integers or any other
text without spaces and are kept as the strings in the file. There are no timestamps:
``timestamp`` is null and ``order`` is the item's position in the line. A user on two lines is a
malformed line (which of the two sequences comes first is unknown). ``rows_read`` counts lines,
i.e. users.

data.path is the ``.txt`` file, or a folder holding exactly one (S3-Rec folders also hold
``*_sample.txt`` negatives: point data.path at the sequence file then). Item content is optional,
from beside the file, as for ``sasrec-txt``: ``movies.dat`` and ``posters/<id>.jpg``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

from molar.config import DataParams
from molar.data.readers.sasrec_txt import movie_items, sequence_file
from molar.data.schema import IngestReport, drop_bad_lines, order_interactions, read_lines

EXPECTED_LINE = "a user id followed by that user's item ids, whitespace-separated ('user item item ...'), one line per user"


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    file = sequence_file(path, "'user item item ...' lines")
    lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
    frame = lines.with_columns(pl.col("line").str.extract_all(r"\S+").alias("_ids"))
    user = pl.col("_ids").list.first()
    ok = (pl.col("_ids").list.len() >= 2) & user.is_first_distinct()
    frame = drop_bad_lines(frame, ok, file, EXPECTED_LINE, report, cfg.on_bad_line)
    rows = frame.select(
        user.alias("user_id"), pl.col("_ids").list.slice(1).alias("item_id"), pl.lit(None, dtype=pl.Int64).alias("timestamp")
    ).explode("item_id")
    return movie_items(order_interactions(rows), file.parent, cfg, report, "user-seq")
