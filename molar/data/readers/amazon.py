"""Amazon review reader (data.source: amazon): the Amazon Review Data 2018 (McAuley lab) files.

Files in data.path (plain or gzipped JSON lines, ``.json``/``.jsonl`` with optional ``.gz``):
- reviews, e.g. ``Video_Games_5.json.gz``: one review object per line; used fields ``reviewerID``
  (user), ``asin`` (item) and ``unixReviewTime`` (seconds). Other fields (overall, reviewText, ...)
  are ignored: every review is an interaction.
- metadata, the file whose name starts with ``meta_``, e.g. ``meta_Video_Games.json.gz``: one
  product per line with ``asin``, ``title``, ``description`` (list of paragraphs or a string),
  ``brand``, ``price`` (text such as "$9.99"), ``category`` (a list from broad to narrow),
  ``main_cat``, ``feature`` (list), ``imageURL`` and ``imageURLHighRes`` (lists of URLs).
  The 2014 release's metadata also works: lines that are Python literals rather than JSON, with
  ``categories`` (list of lists) and ``imUrl``.

Items: title, description (paragraphs joined), attributes {brand, price, category ("A > B > C"),
main_cat, features ("x; y")}. HTML tags and entities, common in these fields, are removed. Products
are listed in metadata order, only those that were reviewed; a product repeated in the metadata
keeps its first record; reviews of products without metadata are dropped by ingest
(``unknown_item``), those of a product whose metadata line was skipped (data.on_bad_line: skip) as
``item_line_skipped``. A bad review line is reported with the field that is missing or mistyped. Images are never downloaded: an item's image is ``images/<asin>.jpg`` in
data.path, else the file in ``images/`` named like the last part of one of its image URLs
(high-resolution first), when present.

Speed: the reviews are decoded with ``polars.read_ndjson`` in one pass (about 1 s per million); only
when some line is not a complete review are they decoded line by line, to name the bad lines.
Metadata lines are parsed one by one, but only those of reviewed products (found with a vectorised
search for their asin).
"""

from __future__ import annotations

import ast
import gzip
import html
import io
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import polars as pl

from molar.config import DataParams
from molar.data.schema import (
    BadInputError,
    IngestReport,
    catalog_items,
    drop_items_of_skipped_lines,
    order_interactions,
    read_lines,
    validate,
)

REVIEW_FIELDS = {"reviewerID": pl.String, "asin": pl.String, "unixReviewTime": pl.Int64}
EXPECTED_REVIEW = "a JSON object with string reviewerID and asin and an integer unixReviewTime"
EXPECTED_META = "a JSON object (or, 2014 format, a Python dict) with a string asin"
JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")
ASIN_IN_LINE = r"""["']asin["']\s*:\s*["']([^"']*)["']"""
TAG = re.compile(r"<[^>]*>")
SPACE = re.compile(r"\s+")


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    json_files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(JSON_SUFFIXES))
    reviews = [p for p in json_files if not p.name.startswith("meta_")]
    review_file = _one(path, reviews, "reviews (e.g. Video_Games_5.json.gz)")
    meta_file = _one(path, [p for p in json_files if p.name.startswith("meta_")], "metadata (meta_<Category>.json[.gz])")

    interactions = order_interactions(_read_reviews(review_file, cfg, report))
    used = set(interactions["item_id"].unique().to_list())
    content, image_urls = _read_meta(meta_file, used, cfg, report)
    interactions = drop_items_of_skipped_lines(interactions, content, report)
    images = path / "images"
    items = catalog_items(interactions, content, lambda asin: _image_of(images, asin, image_urls.get(asin, [])), report)
    return validate(items, interactions, "amazon", report)


def _one(path: Path, files: list[Path], what: str) -> Path:
    if len(files) != 1:
        found = ", ".join(f.name for f in files) or "none"
        raise BadInputError(f"{path}: expected exactly one Amazon {what} file in data.path (found {found})")
    return files[0]


def _id(value: object) -> str | None:
    """An id as text: strings as they are, integers (some asins look numeric) printed."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _seconds(value: object) -> int | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    return None


def _reviews_fast(file: Path) -> pl.DataFrame | None:
    """All reviews in one vectorised pass, or None when any line is not a complete review (or blank),
    since only the line-by-line path can name such lines."""
    data = file.read_bytes()
    if file.suffix == ".gz":
        data = gzip.decompress(data)
    if not data.strip():
        return None
    n_lines = data.count(b"\n") + (not data.endswith(b"\n"))
    try:
        frame = pl.read_ndjson(io.BytesIO(data), schema=REVIEW_FIELDS)
    except pl.exceptions.PolarsError:
        return None
    # fill_null: a missing id compares as null, which .all() would skip
    complete = frame.select(
        pl.all_horizontal(pl.col("reviewerID") != "", pl.col("asin") != "", pl.col("unixReviewTime").is_not_null())
        .fill_null(False)
        .all()
    ).item()
    return frame if frame.height == n_lines and complete else None


def _review_problem(line: str) -> tuple[tuple, str | None]:
    """(reviewerID, asin, unixReviewTime) of a review line, and what is wrong with it (None: nothing)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as error:
        return (None, None, None), f"not valid JSON ({error.msg} at column {error.colno})"
    if not isinstance(obj, dict):
        return (None, None, None), f"a JSON {type(obj).__name__}, not an object"
    values = (_id(obj.get("reviewerID")), _id(obj.get("asin")), _seconds(obj.get("unixReviewTime")))
    for name, value in zip(REVIEW_FIELDS, values):
        if name not in obj:
            return values, f"{name} is missing"
        if value is None or value == "":
            wanted = "an integer" if name == "unixReviewTime" else "a non-empty string"
            return values, f"{name} is {json.dumps(obj[name], ensure_ascii=False)[:40]}, not {wanted}"
    return values, None


def _read_reviews(file: Path, cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    decoded = _reviews_fast(file)
    if decoded is not None:
        report.rows_read += decoded.height
    else:
        lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
        rows = []
        for line_no, line in lines.iter_rows():
            values, problem = _review_problem(line)
            if problem:
                report.bad_line(cfg.on_bad_line, file, line_no, f"{EXPECTED_REVIEW}: {problem}", line)
            else:
                rows.append(values)
        decoded = pl.DataFrame(rows, schema=REVIEW_FIELDS, orient="row")
    return decoded.select(
        pl.col("reviewerID").alias("user_id"), pl.col("asin").alias("item_id"), pl.col("unixReviewTime").alias("timestamp")
    )


def _clean(text: object) -> str:
    """Plain text from a metadata string: HTML tags and entities removed, whitespace collapsed."""
    if not isinstance(text, (str, int, float)) or isinstance(text, bool):
        return ""
    return SPACE.sub(" ", html.unescape(TAG.sub(" ", str(text)))).strip()


def _joined(value: object, sep: str) -> str:
    """A string, or a list of strings (or of lists, 2014 categories), as one string."""
    if isinstance(value, list):
        parts = [_joined(v, " > ") if isinstance(v, list) else _clean(v) for v in value]
        return sep.join(p for p in parts if p)
    return _clean(value)


def _parse_meta(line: str) -> object:
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        pass
    try:  # the 2014 metadata is written as Python literals
        return ast.literal_eval(line)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None


def _read_meta(
    file: Path, used: set[str], cfg: DataParams, report: IngestReport
) -> tuple[dict[str, dict], dict[str, list[str]]]:
    """Metadata of the reviewed products: ({asin: content}, {asin: image URLs, high-res first})."""
    lines = read_lines(file, report, cfg.on_bad_line)
    # parse only the lines of reviewed products (and lines whose asin the search cannot see)
    asin = pl.col("line").str.extract(ASIN_IN_LINE, 1)
    lines = lines.filter(asin.is_null() | asin.is_in(list(used)))
    content: dict[str, dict] = {}
    image_urls: dict[str, list[str]] = {}
    for line_no, line in lines.iter_rows():
        obj = _parse_meta(line)
        item_id = _id(obj.get("asin")) if isinstance(obj, dict) else None
        if not item_id:
            seen_asin = re.search(ASIN_IN_LINE, line)
            report.bad_line(cfg.on_bad_line, file, line_no, EXPECTED_META, line, seen_asin and seen_asin[1])
            continue
        if item_id in content or item_id not in used:
            continue  # repeated product (first record wins) or nobody reviewed it
        category = obj.get("category") or obj.get("categories") or []
        # 2018: one path ["A", "B"] -> "A > B"; 2014: several paths [["A"], ["A", "B"]] -> "A; A > B"
        nested = isinstance(category, list) and any(isinstance(c, list) for c in category)
        content[item_id] = {
            "title": _clean(obj.get("title")) or f"item {item_id}",
            "description": _joined(obj.get("description"), " "),
            "attributes": {
                "brand": _clean(obj.get("brand")),
                "price": _clean(obj.get("price")),
                "category": _joined(category, "; " if nested else " > "),
                "main_cat": _clean(obj.get("main_cat")),
                "features": _joined(obj.get("feature"), "; "),
            },
        }
        urls = []
        for key in ("imageURLHighRes", "imageURL", "imUrl"):
            value = obj.get(key)
            urls += [u for u in (value if isinstance(value, list) else [value]) if isinstance(u, str) and u]
        image_urls[item_id] = urls
    return content, image_urls


def _image_of(images: Path, asin: str, urls: list[str]) -> Path:
    """``images/<asin>.jpg``, else the first ``images/<URL basename>`` that exists (else the former)."""
    by_asin = images / f"{asin}.jpg"
    if by_asin.exists():
        return by_asin
    for url in urls:
        name = urlsplit(url).path.rsplit("/", 1)[-1]
        if name and (images / name).exists():
            return images / name
    return by_asin
