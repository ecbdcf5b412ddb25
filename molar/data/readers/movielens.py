"""MovieLens reader (data.source: movielens): the raw GroupLens ml-1m and ml-100k files.

The release is told apart by the files in data.path:
- ml-1m: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``) and ``movies.dat``
  (``MovieID::Title::Genres``, genres ``|``-separated); ``::``-separated.
  ``users.dat`` is not read: the interim tables carry no user features.
- ml-100k: ``u.data`` (``user item rating timestamp``, tab-separated), ``u.item`` (``|``-separated:
  movie id | title | release date | video release date | IMDb URL | one 0/1 flag per
  genre) and ``u.genre`` (``name|index``: the order of those flags).

GroupLens publishes ISO-8859-1, but copies re-saved as UTF-8 are common: each file is decoded as
UTF-8 when it is valid UTF-8 with non-ASCII characters, else as Latin-1 (``schema.legacy_encoding``);
metrics/ingest.json lists the encoding used per file.

Every rating is an interaction (implicit feedback), whatever its value; a user's ratings are ordered
by timestamp, ties in file order. A title's trailing "(1995)" becomes the attribute ``year``;
attributes are {"genres": "Animation, Children's, Comedy", "year": 1995} (ml-100k adds
``release_date``); the description is one sentence built from title, year and genres. Item images:
``posters/<MovieID>.jpg`` inside data.path, when present. Only movies that someone rated are listed;
a rating of a movie missing from the movie file is dropped by ingest (``unknown_item``), one whose
movie line was skipped (data.on_bad_line: skip) as ``item_line_skipped``.
"""

from __future__ import annotations

import re
from pathlib import Path

import polars as pl

from molar.config import DataParams
from molar.data.schema import (
    INT_PATTERN,
    UTF8_OR_LATIN1,
    BadInputError,
    IngestReport,
    catalog_items,
    drop_bad_lines,
    drop_items_of_skipped_lines,
    first_field,
    order_interactions,
    read_lines,
    require_file,
    split_fields,
    validate,
)

ENCODING = UTF8_OR_LATIN1  # GroupLens files are ISO-8859-1, copies often UTF-8
YEAR_SUFFIX = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*$")
ML1M_RATING = "UserID::MovieID::Rating::Timestamp (integer ids and time, numeric rating)"
ML100K_RATING = "4 tab-separated fields: user item rating timestamp (integer ids and time)"


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    if (path / "ratings.dat").is_file():
        ratings = _read_ratings(path / "ratings.dat", "::", ML1M_RATING, cfg, report)
        movies = require_file(path / "movies.dat", "the ml-1m movie file (MovieID::Title::Genres)")
        content = read_movies_dat(movies, cfg, report)
    elif (path / "u.data").is_file():
        ratings = _read_ratings(path / "u.data", None, ML100K_RATING, cfg, report)
        genres = _read_u_genre(require_file(path / "u.genre", "the ml-100k genre list (name|index)"), cfg, report)
        movies = require_file(path / "u.item", "the ml-100k movie file (id|title|...|genre flags)")
        content = _read_u_item(movies, genres, cfg, report)
    else:
        raise BadInputError(
            f"{path}: no MovieLens ratings found; expected ratings.dat and movies.dat (ml-1m) "
            "or u.data, u.item and u.genre (ml-100k) in data.path"
        )
    interactions = drop_items_of_skipped_lines(order_interactions(ratings), content, report)
    items = catalog_items(interactions, content, lambda item_id: path / "posters" / f"{item_id}.jpg", report)
    return validate(items, interactions, "movielens", report)


def movie_content(raw_title: str, genres: list[str], extra: dict | None = None) -> dict:
    """Title without its "(year)", attributes {genres, year, ...extra} and a one-sentence description."""
    match = YEAR_SUFFIX.match(raw_title)
    title, year = (match["title"], int(match["year"])) if match else (raw_title.strip(), None)
    sentence = f"{title} is a {year} film" if year is not None else f"{title} is a film"
    if len(genres) == 1:
        sentence += f" in the genre {genres[0]}"
    elif genres:
        sentence += f" in the genres {', '.join(genres[:-1])} and {genres[-1]}"
    attributes = {"genres": ", ".join(genres), "year": year, **(extra or {})}
    return {"title": title, "description": sentence + ".", "attributes": attributes}


def read_movies_dat(file: Path, cfg: DataParams, report: IngestReport) -> dict[str, dict]:
    """``movies.dat`` (MovieID::Title::Genres) -> {MovieID: content}, in file order."""
    expected = "MovieID::Title::Genres with an integer MovieID not seen before"
    frame = split_fields(read_lines(file, report, cfg.on_bad_line, ENCODING), "::", 3)
    ok = pl.col("fields_ok") & pl.col("f0").str.contains(INT_PATTERN) & pl.col("f0").is_first_distinct()
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line, first_field("::"))
    return {
        movie_id: movie_content(title, [g for g in genres.split("|") if g])
        for movie_id, title, genres in frame.select("f0", "f1", "f2").iter_rows()
    }


def _read_ratings(file: Path, sep: str | None, expected: str, cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    lines = read_lines(file, report, cfg.on_bad_line, ENCODING, interaction_rows=True)
    frame = split_fields(lines, sep, 4)
    ok = (
        pl.col("fields_ok")
        & pl.col("f0").str.contains(INT_PATTERN)
        & pl.col("f1").str.contains(INT_PATTERN)
        & pl.col("f2").cast(pl.Float64, strict=False).is_not_null()
        & pl.col("f3").str.contains(INT_PATTERN)
    )
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line)
    return frame.select(
        pl.col("f0").alias("user_id"), pl.col("f1").alias("item_id"), pl.col("f3").cast(pl.Int64).alias("timestamp")
    )


def _read_u_genre(file: Path, cfg: DataParams, report: IngestReport) -> list[str]:
    """``u.genre`` (name|index) -> genre names in flag order."""
    frame = split_fields(read_lines(file, report, cfg.on_bad_line, ENCODING), "|", 2)
    ok = pl.col("fields_ok") & pl.col("f1").str.contains(INT_PATTERN)
    frame = drop_bad_lines(frame, ok, file, "name|index with an integer index", report, cfg.on_bad_line)
    by_index = dict(frame.select(pl.col("f1").cast(pl.Int64), "f0").iter_rows())
    if sorted(by_index) != list(range(len(by_index))):
        raise BadInputError(f"{file}: genre indices must be 0..n-1 without gaps; got {sorted(by_index)}")
    return [by_index[i] for i in range(len(by_index))]


def _read_u_item(file: Path, genres: list[str], cfg: DataParams, report: IngestReport) -> dict[str, dict]:
    """``u.item`` -> {movie id: content}, in file order; genre flags named by ``u.genre``."""
    n_fields = 5 + len(genres)
    expected = (
        f"{n_fields} |-separated fields: movie id|title|release date|video release date|IMDb URL"
        f"|{len(genres)} genre flags (0/1), with an integer movie id not seen before"
    )
    frame = split_fields(read_lines(file, report, cfg.on_bad_line, ENCODING), "|", n_fields)
    flags = [pl.col(f"f{5 + i}").is_in(["0", "1"]) for i in range(len(genres))]
    ok = pl.all_horizontal(
        pl.col("fields_ok"), pl.col("f0").str.contains(INT_PATTERN), pl.col("f0").is_first_distinct(), *flags
    )
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line, first_field("|"))
    content = {}
    for row in frame.select([f"f{i}" for i in range(n_fields)]).iter_rows():
        # "unknown" is the flag of movies without a genre, not a genre
        movie_genres = [g for g, flag in zip(genres, row[5:]) if flag == "1" and g != "unknown"]
        content[row[0]] = movie_content(row[1], movie_genres, {"release_date": row[2]})
    return content
