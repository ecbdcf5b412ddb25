"""The interim tables every reader produces (DESIGN.md section 3) and the ingest report.

items:        item_id (str), title (str), description (str), attributes (str: a JSON object),
              image_path (str, nullable)
interactions: user_id (str), item_id (str), timestamp (int64, nullable), order (int64: position of
              the row in the source, within the user; breaks timestamp ties in source order)
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from molar.errors import UserError

ITEMS_SCHEMA = {
    "item_id": pl.String,
    "title": pl.String,
    "description": pl.String,
    "attributes": pl.String,
    "image_path": pl.String,
}
INTERACTIONS_SCHEMA = {
    "user_id": pl.String,
    "item_id": pl.String,
    "timestamp": pl.Int64,
    "order": pl.Int64,
}


class BadInputError(UserError):
    """Input that does not match its format; the message names file, line and what was expected."""


@dataclass
class IngestReport:
    """What ingest read, kept and dropped (written to metrics/ingest.json)."""

    source: str
    rows_read: int = 0
    dropped: Counter = field(default_factory=Counter)
    items_with_image: int = 0
    items_without_image: int = 0
    bad_images: int = 0
    encodings: dict[str, str] = field(default_factory=dict)  # file name -> the encoding it was decoded with
    # not written out: ids of items whose item-file line was skipped, and where the first skip was
    skipped_item_ids: set[str] = field(default_factory=set)
    first_skip: str = ""

    def bad_line(
        self, on_bad_line: str, file: Path | str, line_no: int, expected: str, line: str = "", item_id: str | None = None
    ) -> None:
        """Raise a clear error, or (on_bad_line: skip) count the line as dropped.

        ``item_id``: the item an item-file line describes, when it can be told; its interactions are
        then dropped as ``item_line_skipped`` (``drop_items_of_skipped_lines``), not as unknown items.
        """
        if on_bad_line == "skip":
            self.dropped["bad_line"] += 1
            self.first_skip = self.first_skip or f"{file}:{line_no}: expected {expected}"
            if item_id:
                self.skipped_item_ids.add(item_id)
            return
        shown = line.strip()[:120]
        raise BadInputError(
            f"{file}:{line_no}: expected {expected}; got {shown!r}. "
            "Fix the line, or set data.on_bad_line: skip in params.yaml to drop such lines."
        )

    def as_dict(self, n_items: int, n_interactions: int) -> dict:
        return {
            "source": self.source,
            "rows_read": self.rows_read,
            "rows_kept": n_interactions,
            "rows_dropped": dict(sorted(self.dropped.items())),
            "items": n_items,
            "items_with_image": self.items_with_image,
            "items_without_image": self.items_without_image,
            "bad_images": self.bad_images,
            "encodings": dict(sorted(self.encodings.items())),
        }


def check_image(path: Path, report: IngestReport) -> str | None:
    """Return the path as a string if it holds a decodable image, else None (counted)."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        report.items_without_image += 1
        return None
    try:
        with Image.open(path) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        report.bad_images += 1
        report.items_without_image += 1
        return None
    report.items_with_image += 1
    return str(path)


def attributes_json(attrs: dict) -> str:
    return json.dumps({k: v for k, v in attrs.items() if v not in (None, "", [])}, ensure_ascii=False, sort_keys=True)


def make_items(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=ITEMS_SCHEMA, orient="row") if rows else pl.DataFrame(schema=ITEMS_SCHEMA)


def make_interactions(rows: list[tuple]) -> pl.DataFrame:
    """rows: (user_id, item_id, timestamp or None); order is assigned per user in row order."""
    df = pl.DataFrame(rows, schema={k: INTERACTIONS_SCHEMA[k] for k in ("user_id", "item_id", "timestamp")}, orient="row")
    return df.with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("order"))


def validate(
    items: pl.DataFrame, interactions: pl.DataFrame, source: str, report: IngestReport | None = None
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Cast to the interim schema and check the invariants later stages rely on.

    With ``report``, "no interactions" says why when lines were skipped (data.on_bad_line: skip)."""
    items = items.select([pl.col(c).cast(t) for c, t in ITEMS_SCHEMA.items()])
    interactions = interactions.select([pl.col(c).cast(t) for c, t in INTERACTIONS_SCHEMA.items()])
    if interactions.height == 0 and report is not None and report.first_skip:
        dropped = ", ".join(f"{n:,} {why}" for why, n in sorted(report.dropped.items()))
        raise BadInputError(
            f"{source}: no interactions were read: data.on_bad_line: skip dropped them all ({dropped}); "
            f"the first skipped line: {report.first_skip}. Fix the file, or check that data.source names its format "
            "(the Data sources table in README.md lists each format)"
        )
    if interactions.height == 0 and report is not None and report.dropped:
        dropped = ", ".join(f"{n:,} {why}" for why, n in sorted(report.dropped.items()))
        raise BadInputError(
            f"{source}: no interactions are left after dropping {dropped} (metrics/ingest.json's rows_dropped says "
            "what each reason means): check that the item file and the interaction file belong together"
        )
    if interactions.height == 0:
        raise BadInputError(f"{source}: no interactions were read; check data.path and the file format")
    if items.height == 0:
        raise BadInputError(f"{source}: no items were read; check data.path and the file format")
    dup = items.filter(pl.col("item_id").is_duplicated())
    if dup.height:
        raise BadInputError(f"{source}: item ids are not unique, e.g. {dup['item_id'][0]!r}")
    return items, interactions


# ------------------------------------------------------------ helpers shared by the raw-format readers
from collections.abc import Callable  # noqa: E402  (kept beside the helpers that use it)

INT_PATTERN = r"^[+-]?\d+$"
# read_lines' encoding for files published in either encoding (GroupLens' Latin-1 and UTF-8 copies)
UTF8_OR_LATIN1 = "utf-8 or latin-1"


def legacy_encoding(data: bytes) -> str:
    """UTF-8 for valid UTF-8 text with non-ASCII characters, else Latin-1 (which decodes any bytes).

    Latin-1 text with accents is almost never valid UTF-8, and UTF-8 read as Latin-1 gives mojibake
    ("CafÃ©"), so valid UTF-8 wins; ASCII reads the same either way."""
    if data.isascii():
        return "latin-1"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "latin-1"
    return "utf-8"


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise naming the path and what it should hold."""
    if not path.is_file():
        raise BadInputError(f"{path}: file not found; expected {what}. Check data.path and data.source.")
    return path


def read_lines(
    path: Path, report: IngestReport, on_bad_line: str, encoding: str = "utf-8", interaction_rows: bool = False
) -> pl.DataFrame:
    """The non-blank lines of a text file (``.gz`` read transparently) as (line_no: 1-based, line).

    ``encoding`` UTF8_OR_LATIN1 decides per file (``legacy_encoding``); the encoding used is recorded
    in ``report.encodings`` under the file's name. The whole file is decoded at once (fast); only if
    that fails is it decoded line by line, so an undecodable line is reported with its number (or
    skipped and counted). Line ends (``\\n``,
    ``\\r\\n``) and a UTF-8 byte-order mark are removed; blank lines are not data and are dropped.
    With ``interaction_rows`` every non-blank line (undecodable ones too) counts in ``report.rows_read``.
    """
    import gzip

    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if encoding == UTF8_OR_LATIN1:
        encoding = legacy_encoding(data)
    report.encodings[path.name] = encoding
    try:
        lines = data.decode(encoding).split("\n")
    except UnicodeDecodeError:
        lines = []
        for line_no, raw in enumerate(data.split(b"\n"), start=1):
            try:
                lines.append(raw.decode(encoding))
            except UnicodeDecodeError:
                report.rows_read += int(interaction_rows)
                report.bad_line(on_bad_line, path, line_no, f"{encoding} text", raw.decode(encoding, errors="replace"))
                lines.append("")  # keeps the numbering; dropped below as blank
    if lines:
        lines[0] = lines[0].removeprefix("\ufeff")
    frame = pl.DataFrame({"line": lines}, schema={"line": pl.String}).with_row_index("line_no", offset=1)
    frame = frame.with_columns(pl.col("line_no").cast(pl.Int64), pl.col("line").str.strip_suffix("\r"))
    frame = frame.filter(pl.col("line").str.strip_chars() != "")
    if interaction_rows:
        report.rows_read += frame.height
    return frame


def split_fields(lines: pl.DataFrame, sep: str | None, n_fields: int) -> pl.DataFrame:
    """Add string columns f0..f{n_fields-1}: each line split on ``sep`` (None: runs of whitespace).

    A line with another number of fields gets nulls there and ``fields_ok`` false.
    """
    parts = pl.col("line").str.extract_all(r"\S+") if sep is None else pl.col("line").str.split(sep)
    frame = lines.with_columns(parts.alias("_parts"))
    fields_ok = pl.col("_parts").list.len() == n_fields
    columns = [
        pl.when(fields_ok).then(pl.col("_parts").list.get(i, null_on_oob=True)).alias(f"f{i}") for i in range(n_fields)
    ]
    return frame.with_columns(*columns, fields_ok.alias("fields_ok")).drop("_parts")


def drop_bad_lines(
    frame: pl.DataFrame,
    ok: pl.Expr,
    path: Path,
    expected: str,
    report: IngestReport,
    on_bad_line: str,
    item_id: pl.Expr | None = None,
) -> pl.DataFrame:
    """Keep the rows where ``ok`` holds; every other row goes through ``report.bad_line`` in line order
    (raising on the first unless data.on_bad_line is skip). ``frame`` needs line_no and line columns.
    ``item_id`` (item files): the id a line describes, read from the raw ``line`` column."""
    frame = frame.with_columns(ok.fill_null(False).alias("_ok"))
    ids = item_id if item_id is not None else pl.lit(None)
    bad = frame.filter(~pl.col("_ok")).select("line_no", "line", ids.alias("_id"))
    for line_no, line, bad_id in bad.iter_rows():
        report.bad_line(on_bad_line, path, line_no, expected, line, None if bad_id is None else str(bad_id).strip())
    return frame.filter(pl.col("_ok")).drop("_ok")


def first_field(sep: str) -> pl.Expr:
    """The first ``sep``-separated field of the raw line: the item id of a malformed item-file line."""
    return pl.col("line").str.split(sep).list.first()


def drop_items_of_skipped_lines(interactions: pl.DataFrame, content: dict, report: IngestReport) -> pl.DataFrame:
    """Drop the interactions of items whose item-file line was skipped (data.on_bad_line: skip), counted
    as ``item_line_skipped``: the item is not unknown, its description was unreadable. An item that
    another (earlier) line describes stays. ``order``, when present, stays the position within the user."""
    lost = [item_id for item_id in report.skipped_item_ids if item_id not in content]
    gone = interactions["item_id"].is_in(lost)
    if not gone.any():
        return interactions
    report.dropped["item_line_skipped"] += int(gone.sum())
    interactions = interactions.filter(~gone)
    if "order" in interactions.columns:
        interactions = interactions.with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("order"))
    return interactions


def order_interactions(frame: pl.DataFrame) -> pl.DataFrame:
    """Interim interactions from (user_id, item_id, timestamp) rows in source order.

    Each user's rows are sorted by timestamp with a stable sort, so ties and missing timestamps keep
    the source order; users stay in order of first appearance; ``order`` is the position within the user.
    """
    frame = frame.select(
        pl.col("user_id").cast(pl.String), pl.col("item_id").cast(pl.String), pl.col("timestamp").cast(pl.Int64)
    ).with_row_index("_row")
    frame = frame.with_columns(pl.col("_row").min().over("user_id").alias("_first"))
    frame = frame.sort(["_first", "timestamp"], nulls_last=True, maintain_order=True)
    frame = frame.with_columns(pl.int_range(pl.len()).over("user_id").cast(pl.Int64).alias("order"))
    return frame.select(list(INTERACTIONS_SCHEMA))


def placeholder_item(item_id: str) -> dict:
    """Content for an item the source describes nowhere: a title naming its id, nothing else."""
    return {"title": f"item {item_id}", "description": "", "attributes": {}}


def catalog_items(
    interactions: pl.DataFrame,
    content: dict[str, dict] | None,
    image_of: Callable[[str], Path],
    report: IngestReport,
) -> pl.DataFrame:
    """The item table for the items that occur in ``interactions``.

    ``content`` maps item_id -> {"title", "description", "attributes": dict} in the order of the
    source's item file; items are listed in that order and items missing from it are left out
    (ingest drops their interactions as ``unknown_item``). With ``content`` None (a source with no
    item file) every item gets a placeholder: title "item <id>", empty description, no attributes,
    listed in order of first appearance. ``image_of(item_id)`` names the item's image file; it is
    checked with ``check_image`` (missing or undecodable: image null, counted).
    """
    used = interactions["item_id"].unique(maintain_order=True).to_list()
    if content is None:
        content = {item_id: placeholder_item(item_id) for item_id in used}
    used_set = set(used)
    rows = []
    for item_id, item in content.items():
        if item_id not in used_set:
            continue
        rows.append(
            {
                "item_id": item_id,
                "title": item["title"],
                "description": item["description"],
                "attributes": attributes_json(item["attributes"]),
                "image_path": check_image(image_of(item_id), report),
            }
        )
    return make_items(rows)
