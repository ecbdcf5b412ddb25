"""RecBole atomic-file reader (data.source: recbole).

RecBole's atomic files, as its dataset converters write them: UTF-8, tab-separated, no quoting,
and a header line whose columns are ``name:type`` with type ``token``, ``token_seq`` (values joined
by spaces), ``float`` or ``float_seq``; e.g. ``user_id:token	item_id:token	rating:float
timestamp:float`` and ``item_id:token	movie_title:token_seq	release_year:token	genre:token_seq``.

Files, in data.path: ``<name>.inter`` (required; ``<folder name>.inter`` when there are several,
else the only one) and ``<name>.item`` (optional) of the same name. ``.user`` and the other atomic
files are not read. Interaction columns used: ``user_id`` and ``item_id`` (RecBole's default field
names; required) and ``timestamp`` (optional; a float number of seconds, kept as an integer).
A user's rows are ordered by timestamp, ties (or no timestamp at all) in file order.

Items: the first title-like column (``title``, ``movie_title`` or any ``*_title``) is the title and a
``description`` column the description; every other column goes into attributes (``float``
columns as numbers, others as the raw text; empty values left out). Without a ``.item`` file every
item is a placeholder "item <id>"; with one, interactions of items it lacks are dropped by ingest
(``unknown_item``). Images: ``images/<item_id>.jpg`` in data.path when present (RecBole has no
image convention of its own).
"""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl

from molar.config import DataParams
from molar.data.schema import (
    BadInputError,
    IngestReport,
    catalog_items,
    drop_bad_lines,
    order_interactions,
    read_lines,
    split_fields,
    validate,
)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
USER, ITEM, TIME = "user_id", "item_id", "timestamp"


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    inter_file = _inter_file(path)
    interactions = order_interactions(_read_inter(inter_file, cfg, report))
    item_file = inter_file.with_suffix(".item")
    content = _read_item(item_file, cfg, report) if item_file.is_file() else None
    items = catalog_items(interactions, content, lambda item_id: path / "images" / f"{item_id}.jpg", report)
    return validate(items, interactions, "recbole")


def _inter_file(path: Path) -> Path:
    candidates = sorted(path.glob("*.inter"))
    named = path / f"{path.name}.inter"
    if named.is_file():
        return named
    if len(candidates) != 1:
        found = ", ".join(c.name for c in candidates) or "none"
        raise BadInputError(
            f"{path}: expected one RecBole interaction file <name>.inter, or {named.name} among several (found {found})"
        )
    return candidates[0]


def _header(lines: pl.DataFrame, file: Path, required: tuple[str, ...]) -> list[tuple[str, str]]:
    """Parse the ``name:type`` header (the first line) into [(name, type)]."""
    expected = (
        f"a header of tab-separated name:type columns (types {', '.join(FIELD_TYPES)}) including {', '.join(required)}"
    )
    if lines.height == 0:
        raise BadInputError(f"{file}: the file is empty; expected {expected}")
    line_no, line = lines.row(0)
    columns = []
    for column in line.split("\t"):
        name, _, kind = column.strip().rpartition(":")
        if not name or kind not in FIELD_TYPES:
            raise BadInputError(f"{file}:{line_no}: expected {expected}; column {column!r} is not name:type")
        columns.append((name, kind))
    names = [name for name, _ in columns]
    missing = [name for name in required if name not in names]
    if missing or len(set(names)) != len(names):
        raise BadInputError(f"{file}:{line_no}: expected {expected}; got {line.strip()!r}")
    return columns


def _field(columns: list[tuple[str, str]], name: str) -> pl.Expr:
    return pl.col(f"f{[n for n, _ in columns].index(name)}")


def _timestamp(value: pl.Expr) -> pl.Expr:
    """A RecBole float timestamp as int64 seconds: exact for integer text, truncated for fractions."""
    return pl.coalesce(value.str.to_integer(strict=False), value.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False))


def _read_inter(file: Path, cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
    columns = _header(lines, file, (USER, ITEM))
    report.rows_read -= 1  # the header is not a row
    rows = lines.slice(1)
    frame = split_fields(rows, "\t", len(columns))
    names = [name for name, _ in columns]
    has_time = TIME in names
    user, item = _field(columns, USER), _field(columns, ITEM)
    time = _timestamp(_field(columns, TIME)) if has_time else pl.lit(None, dtype=pl.Int64)
    ok = pl.col("fields_ok") & (user.str.strip_chars() != "") & (item.str.strip_chars() != "")
    if has_time:
        ok = ok & time.is_not_null()
    expected = f"{len(columns)} tab-separated fields ({', '.join(names)}) with non-empty user_id and item_id" + (
        " and a numeric timestamp" if has_time else ""
    )
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line)
    return frame.select(user.alias("user_id"), item.alias("item_id"), time.alias("timestamp"))


def _is_title(name: str) -> bool:
    return name in ("title", "movie_title") or name.endswith("_title")


def _number(text: str) -> float | int | None:
    """A float field's value for the attributes JSON: whole numbers as ints, nan/inf left out."""
    value = float(text)
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def _read_item(file: Path, cfg: DataParams, report: IngestReport) -> dict[str, dict]:
    """``<name>.item`` -> {item_id: content} in file order."""
    lines = read_lines(file, report, cfg.on_bad_line)
    columns = _header(lines, file, (ITEM,))
    names = [name for name, _ in columns]
    frame = split_fields(lines.slice(1), "\t", len(columns))
    item = _field(columns, ITEM)
    floats = [
        (_field(columns, name) == "") | _field(columns, name).cast(pl.Float64, strict=False).is_not_null()
        for name, kind in columns
        if kind == "float"
    ]
    ok = pl.all_horizontal(pl.col("fields_ok"), item.str.strip_chars() != "", item.is_first_distinct(), *floats)
    expected = (
        f"{len(columns)} tab-separated fields ({', '.join(names)}), "
        "a non-empty item_id not seen before, numbers in float columns"
    )
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line)

    title_name = next((name for name in names if _is_title(name)), None)
    content = {}
    for values in frame.select([f"f{i}" for i in range(len(columns))]).iter_rows():
        row = dict(zip(names, values))
        attributes = {}
        for name, kind in columns:
            if name in (ITEM, title_name, "description") or row[name].strip() == "":
                continue
            attributes[name] = _number(row[name]) if kind == "float" else row[name]
        content[row[ITEM]] = {
            "title": row[title_name] if title_name else f"item {row[ITEM]}",
            "description": row.get("description", ""),
            "attributes": attributes,
        }
    return content
