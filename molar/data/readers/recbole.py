"""RecBole atomic-file reader (data.source: recbole).

RecBole's atomic files, as its dataset converters write them: UTF-8, tab-separated, no quoting,
and a header line whose columns are ``name:type`` with type ``token``, ``token_seq`` (values joined
by spaces), ``float`` or ``float_seq``; e.g. ``user_id:token	item_id:token	rating:float
timestamp:float`` and ``item_id:token	movie_title:token_seq	release_year:token	genre:token_seq``.

Files, in data.path: ``<name>.inter`` (required; ``<folder name>.inter`` when there are several,
else the only one) and ``<name>.item`` (optional) of the same name. The header is checked, not
guessed: user_id and item_id must be ``token`` and timestamp ``float`` (or ``token``); a column of
another type there, or an ``item_id_list`` column, stops with an error naming it. ``.user`` and the other atomic
files are not read. Interaction columns used: ``user_id`` and ``item_id`` (RecBole's default field
names; required) and ``timestamp`` (optional; a float number of seconds, kept as an integer).
A user's rows are ordered by timestamp, ties (or no timestamp at all) in file order.

Items: the first title-like column (``title``, ``movie_title`` or any ``*_title``) is the title and a
``description`` column the description; every other column goes into attributes (``float``
columns as numbers, others as the raw text; empty values left out). Without a ``.item`` file every
item is a placeholder "item <id>"; with one, interactions of items it lacks are dropped by ingest
(``unknown_item``). Images: ``images/<item_id>.jpg`` in data.path when present (RecBole has no
image convention of its own).

Pre-split benchmark files (UniSRec, CoWPiRec and RecBole's ``benchmark_filename``):
``<name>.train.inter``, ``<name>.valid.inter`` and ``<name>.test.inter``, all three, with header
``user_id:token	item_id_list:token_seq	item_id:token`` (history space-separated, oldest first),
and optional item text ``<name>.item`` or ``<name>.text`` (``item_id:token	text:token_seq``: the
text is the title) translated through ``<name>.item2index`` when present (UniSRec's .text uses raw
ids, its .inter files indices). Their split is a leave-one-out split of each user's sequence, so the
full sequences are rebuilt (``_rebuild``) and the split stage's leave-one-out gives back the same
train, valid and test targets. No timestamps: ``order`` is the position in the sequence.
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
    drop_items_of_skipped_lines,
    order_interactions,
    read_lines,
    split_fields,
    validate,
)

FIELD_TYPES = ("token", "token_seq", "float", "float_seq")
USER, ITEM, TIME, ITEM_LIST = "user_id", "item_id", "timestamp", "item_id_list"
SPLITS = ("train", "valid", "test")  # the pre-split benchmark files <name>.<split>.inter, in time order
# the types each column must have: a token_seq read as one id (or the reverse) would misread the file
INTER_TYPES = {USER: ("token",), ITEM: ("token",), TIME: ("float", "token")}
SPLIT_TYPES = {USER: ("token",), ITEM_LIST: ("token_seq",), ITEM: ("token",)}


def read(path: Path, cfg: DataParams, report: IngestReport) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Return (items, interactions) in the interim schema (molar/data/schema.py)."""
    split_files = _split_files(path)
    if split_files:
        interactions = order_interactions(_read_splits(split_files, cfg, report))
        stem = split_files[0].name.removesuffix(".train.inter")
    else:
        inter_file = _inter_file(path)
        interactions = order_interactions(_read_inter(inter_file, cfg, report))
        stem = inter_file.stem
    content = _read_content(path, stem, cfg, report)
    if content is not None:
        interactions = drop_items_of_skipped_lines(interactions, content, report)
    items = catalog_items(interactions, content, lambda item_id: path / "images" / f"{item_id}.jpg", report)
    return validate(items, interactions, "recbole", report)


def _read_content(path: Path, stem: str, cfg: DataParams, report: IngestReport) -> dict[str, dict] | None:
    """Item content from ``<stem>.item``, else ``<stem>.text``; None when neither exists.

    With ``<stem>.item2index`` (UniSRec: ``raw id<TAB>index`` lines; the .inter files use the indices,
    the .text file the raw ids) the content's ids are translated to the indices."""
    item_file = next((f for f in (path / f"{stem}.item", path / f"{stem}.text") if f.is_file()), None)
    if item_file is None:
        return None
    content = _read_item(item_file, cfg, report)
    index_file = path / f"{stem}.item2index"
    if index_file.is_file():
        frame = split_fields(read_lines(index_file, report, cfg.on_bad_line), "\t", 2)
        ok = pl.col("fields_ok") & (pl.col("f0") != "") & (pl.col("f1") != "") & pl.col("f0").is_first_distinct()
        expected = "'raw item id<TAB>index', each raw id once"
        frame = drop_bad_lines(frame, ok, index_file, expected, report, cfg.on_bad_line)
        index_of = dict(frame.select("f0", "f1").iter_rows())
        content = {index_of[item_id]: item for item_id, item in content.items() if item_id in index_of}
    return content


def _split_files(path: Path) -> list[Path]:
    """``<name>.train.inter``, ``.valid.inter``, ``.test.inter`` when data.path holds such files, else []."""
    found = sorted(p for p in path.glob("*.inter") if p.name.endswith(tuple(f".{s}.inter" for s in SPLITS)))
    if not found:
        return []
    names = sorted({p.name.rsplit(".", 2)[0] for p in found})
    name = path.name if path.name in names else names[0]
    if len(names) > 1 and path.name not in names:
        raise BadInputError(
            f"{path}: pre-split RecBole files of several data sets ({', '.join(names)}); keep one set per folder "
            f"or name the folder after the one to read"
        )
    files = [path / f"{name}.{split}.inter" for split in SPLITS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BadInputError(
            f"{path}: {', '.join(p.name for p in found if p.name.startswith(name + '.'))} found, but not "
            f"{', '.join(missing)}: RecBole's pre-split benchmark files come as <name>.train.inter, "
            "<name>.valid.inter and <name>.test.inter, and each user's sequence is rebuilt from all three; "
            "add the missing files"
        )
    plain = sorted(p.name for p in path.glob("*.inter") if p not in files and p.name.rsplit(".", 2)[0] == name)
    if plain:
        raise BadInputError(f"{path}: both pre-split files ({name}.train.inter, ...) and {', '.join(plain)}; keep one kind")
    return files


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


def _header(lines: pl.DataFrame, file: Path, types: dict[str, tuple[str, ...]]) -> list[tuple[str, str]]:
    """Parse the ``name:type`` header (the first line) into [(name, type)].

    ``types``: the columns required, each with the types it may have."""
    required = [f"{name}:{kinds[0]}" for name, kinds in types.items() if name != TIME]
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
    missing = [name for name in types if name != TIME and name not in names]
    if missing or len(set(names)) != len(names):
        raise BadInputError(f"{file}:{line_no}: expected {expected}; got {line.strip()!r}")
    if ITEM_LIST in names and ITEM_LIST not in types:
        raise BadInputError(
            f"{file}:{line_no}: column '{ITEM_LIST}:{columns[names.index(ITEM_LIST)][1]}' holds item histories: "
            "this is one of RecBole's pre-split benchmark files (user_id, item_id_list, item_id), which this reader "
            "would misread as one interaction per line; name the files <name>.train.inter, <name>.valid.inter "
            "and <name>.test.inter (as UniSRec publishes them) and they are read as sequences"
        )
    for name, kind in columns:
        if name in types and kind not in types[name]:
            allowed = " or ".join(f"{name}:{k}" for k in types[name])
            held = "a list of values" if kind.endswith("_seq") else "one value"
            raise BadInputError(
                f"{file}:{line_no}: column '{name}:{kind}' cannot be read: this reader needs {allowed} there, and "
                f"a {kind} column holds {held} per line; fix the header to declare {allowed}"
            )
    return columns


def _field(columns: list[tuple[str, str]], name: str) -> pl.Expr:
    return pl.col(f"f{[n for n, _ in columns].index(name)}")


def _timestamp(value: pl.Expr) -> pl.Expr:
    """A RecBole float timestamp as int64 seconds: exact for integer text, truncated for fractions."""
    return pl.coalesce(value.str.to_integer(strict=False), value.cast(pl.Float64, strict=False).cast(pl.Int64, strict=False))


def _read_inter(file: Path, cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
    columns = _header(lines, file, INTER_TYPES)
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


def _read_splits(files: list[Path], cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    """(user_id, item_id, timestamp null) rows of the sequences rebuilt from the pre-split files."""
    parts = []
    for file in files:
        lines = read_lines(file, report, cfg.on_bad_line, interaction_rows=True)
        columns = _header(lines, file, SPLIT_TYPES)
        report.rows_read -= 1  # the header is not a row
        names = [name for name, _ in columns]
        frame = split_fields(lines.slice(1), "\t", len(columns))
        user, item = _field(columns, USER), _field(columns, ITEM)
        ok = pl.col("fields_ok") & (user.str.strip_chars() != "") & (item.str.strip_chars() != "")
        expected = f"{len(columns)} tab-separated fields ({', '.join(names)}) with non-empty user_id and item_id"
        frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line)
        history = _field(columns, ITEM_LIST).str.extract_all(r"\S+")
        parts.append((file, frame.select("line_no", user.alias("user"), history.alias("history"), item.alias("item"))))
    return _rebuild(parts, cfg, report)


def _rebuild(parts: list[tuple[Path, pl.DataFrame]], cfg: DataParams, report: IngestReport) -> pl.DataFrame:
    """Each user's full sequence from their train rows, valid row and test row (``parts`` in that order).

    Row k of a sequence s (0-based position of its target) holds the history s[:k], cut to its last
    ``longest`` items (UniSRec keeps 50), and the target s[k]. Train rows may come newest first
    (UniSRec writes them so) or oldest first: a user's rows are put oldest first, the sequence is the
    first row's history followed by every row's target, and every row is checked against it. A user
    whose rows do not form one sequence, or with other than one valid and one test row, is an error
    (data.on_bad_line: skip drops the user, counted as ``inconsistent_sequence``).
    """
    rows_of: dict[str, tuple[list, list, list]] = {}
    for kind, (file, frame) in enumerate(parts):
        for line_no, user, history, item in frame.iter_rows():
            rows_of.setdefault(user, ([], [], []))[kind].append((file, line_no, history, item))
    longest = max((len(h) for _, frame in parts for h in frame["history"].to_list()), default=0)
    users, items = [], []
    for user, (train, valid, test) in rows_of.items():
        if len(train) > 1 and len(train[0][2]) > len(train[-1][2]):
            train.reverse()
        sequence, problem = _sequence(user, train, valid, test, parts, longest)
        if problem:
            if cfg.on_bad_line != "skip":
                raise BadInputError(
                    f"{problem}; the train, valid and test files must be one leave-one-out split of the same "
                    "sequences. Fix the files, or set data.on_bad_line: skip in params.yaml to drop such users."
                )
            report.dropped["inconsistent_sequence"] += len(train) + len(valid) + len(test)
            report.first_skip = report.first_skip or problem
            continue
        users += [user] * len(sequence)
        items += sequence
    return pl.DataFrame(
        {"user_id": users, "item_id": items, "timestamp": [None] * len(users)},
        schema={"user_id": pl.String, "item_id": pl.String, "timestamp": pl.Int64},
    )


def _sequence(user: str, train: list, valid: list, test: list, parts: list, longest: int) -> tuple[list, str | None]:
    """A user's sequence from their rows (file, line_no, history, item), oldest first, and what keeps
    the rows from being one sequence (None: nothing)."""
    for (file, _), rows in zip(parts[1:], (valid, test)):
        if len(rows) != 1:
            where = ", ".join(str(line_no) for _, line_no, _, _ in rows)
            return [], f"{file}: user {user!r} has {len(rows)} rows{f' (lines {where})' if rows else ''}; expected one"
    rows = train + valid + test
    sequence = rows[0][2] + [item for *_, item in rows]
    for k, (file, line_no, history, item) in enumerate(rows, start=len(rows[0][2])):
        want = sequence[max(0, k - longest) : k]
        if history != want:
            return [], (
                f"{file}:{line_no}: user {user!r}: item_id_list {' '.join(history)!r} does not continue the sequence "
                f"of the user's earlier rows (expected {' '.join(want)!r} before item {item!r})"
            )
    return sequence, None


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
    columns = _header(lines, file, {ITEM: ("token",)})
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
    item_of_line = pl.col("line").str.split("\t").list.get(names.index(ITEM), null_on_oob=True)
    frame = drop_bad_lines(frame, ok, file, expected, report, cfg.on_bad_line, item_of_line)

    # UniSRec's <name>.text has one text column (title, categories and brand joined): the title
    title_name = next((name for name in names if _is_title(name)), "text" if "text" in names else None)
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
