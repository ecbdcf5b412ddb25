"""PixelRec reader (data.source: pixelrec): interaction CSV + item-information CSV + cover images.

PixelRec (westlake-repl/PixelRec) ships, per subset (Pixel200K, Pixel1M, Pixel8M, PixelRec50K, ...):
- an interaction CSV with header ``item_id,user_id,timestamp`` (ids such as ``i123``/``u456``,
  integer timestamps);
- an item-information CSV whose header includes ``item_id``, ``title``, ``tag`` and
  ``description`` and counters (``view_number``, ``comment_number``, ``thumbup_number``,
  ``share_number``, ``coin_number``, ``favorite_number``, ``barrage_number``; Pixel200K adds
  ``title_en``);
- cover images named ``<item_id>.jpg``.

Files are found by their header, not their name, among the CSVs in data.path and its direct
subfolders (HLLM-style layouts keep ``dataset/Pixel200K.csv`` and ``information/Pixel200K.csv``):
the interaction CSV is the one whose header has ``user_id`` and ``item_id``; the item CSV the one
with ``item_id`` and no ``user_id``. Columns may come in any order; ``timestamp`` is optional.
A user's rows are ordered by timestamp, ties in file order. The interaction file is plain (no quoted
fields): it is split with vectorised polars string operations; the item file may quote titles and
descriptions (commas, line breaks) and is read with the csv module.

Items: ``title`` (``title_en`` when ``title`` is empty), ``description``; every other column goes into
attributes (whole numbers as ints, empty values left out). Items are listed in item-file order, only
those with interactions; interactions of items the item file lacks are dropped by ingest
(``unknown_item``), those of an item whose record was skipped (data.on_bad_line: skip) as
``item_line_skipped``. Images: ``images/<item_id>.jpg`` in data.path, or ``cover/<item_id>.jpg`` (the
release's folder name) when there is no ``images`` folder.
"""

from __future__ import annotations

import csv
from pathlib import Path

import polars as pl

from molar.config import DataParams
from molar.data.schema import (
    INT_PATTERN,
    BadInputError,
    IngestReport,
    catalog_items,
    drop_bad_lines,
    drop_items_of_skipped_lines,
    order_interactions,
    read_lines,
    split_fields,
    validate,
)

USER, ITEM, TIME = "user_id", "item_id", "timestamp"


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    headers = {file: _header(file) for file in sorted(path.glob("*.csv")) + sorted(path.glob("*/*.csv"))}
    inter_files = [f for f, header in headers.items() if USER in header and ITEM in header]
    item_files = [f for f, header in headers.items() if USER not in header and ITEM in header]
    inter_file = _one(path, inter_files, "interaction CSV (header item_id,user_id,timestamp)")
    item_file = _one(path, item_files, "item-information CSV (header with item_id,title,tag,description)")

    interactions = order_interactions(_read_interactions(inter_file, headers[inter_file], cfg, report))
    content = _read_items(item_file, cfg, report)
    interactions = drop_items_of_skipped_lines(interactions, content, report)
    images = path / "images" if (path / "images").is_dir() else path / "cover"
    items = catalog_items(interactions, content, lambda item_id: images / f"{item_id}.jpg", report)
    return validate(items, interactions, "pixelrec", report)


def _header(file: Path) -> list[str]:
    try:
        with open(file, encoding="utf-8-sig", newline="") as handle:
            first = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as error:
        raise BadInputError(f"{file}:1: expected a UTF-8 CSV header line ({error})") from error
    return [name.strip() for name in first]


def _one(path: Path, files: list[Path], what: str) -> Path:
    if len(files) != 1:
        found = ", ".join(str(f.relative_to(path)) for f in files) or "none"
        raise BadInputError(f"{path}: expected exactly one PixelRec {what} in data.path or a subfolder (found {found})")
    return files[0]


def _read_interactions(file: Path, header: list[str], cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
    report.rows_read -= min(lines.height, 1)  # the header is not a row
    rows = lines.slice(1)
    frame = split_fields(rows, ",", len(header))
    field = {name: pl.col(f"f{i}").str.strip_chars().str.strip_chars('"') for i, name in enumerate(header)}
    has_time = TIME in field
    ok = pl.col("fields_ok") & (field[USER] != "") & (field[ITEM] != "")
    if has_time:
        ok = ok & field[TIME].str.contains(INT_PATTERN)
    expected = f"{len(header)} comma-separated fields ({','.join(header)}) with non-empty ids" + (
        " and an integer timestamp" if has_time else ""
    )
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line)
    time = field[TIME].cast(pl.Int64) if has_time else pl.lit(None, dtype=pl.Int64)
    return frame.select(field[USER].alias("user_id"), field[ITEM].alias("item_id"), time.alias("timestamp"))


def _value(text: str) -> int | float | str:
    """A CSV cell for the attributes JSON: numbers as numbers (the counters), the rest as text."""
    for kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            continue
        return value if value == value and abs(value) != float("inf") else text
    return text


def _read_items(file: Path, cfg: DataParams, report: IngestReport) -> dict[str, dict]:
    """The item CSV -> {item_id: content} in file order."""
    content: dict[str, dict] = {}
    with open(file, encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader)]
        expected = f"{len(header)} comma-separated fields ({','.join(header)}) with an item_id not seen before"
        start = reader.line_num + 1
        try:
            for values in reader:
                line_no, start = start, reader.line_num + 1  # a quoted field may span lines
                if not any(v.strip() for v in values):
                    continue
                row = dict(zip(header, values))
                item_id = row.get(ITEM, "").strip()
                if len(values) != len(header) or not item_id or item_id in content:
                    report.bad_line(cfg.on_bad_line, file, line_no, expected, ",".join(values), item_id)
                    continue
                title = row.get("title", "").strip() or row.get("title_en", "").strip() or f"item {item_id}"
                attributes = {
                    name: _value(value.strip())
                    for name, value in row.items()
                    if name not in (ITEM, "title", "description") and value.strip()
                }
                description = row.get("description", "").strip()
                content[item_id] = {"title": title, "description": description, "attributes": attributes}
        except (csv.Error, UnicodeDecodeError) as error:
            raise BadInputError(f"{file}:{start}: expected UTF-8 CSV ({error}); fix the record there") from error
    return content
