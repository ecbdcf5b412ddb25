"""Atomic output writers and the pipeline's file locations.

Every stage output is written to a temporary sibling and renamed into place, so an interrupted
stage never leaves a half-written file for DVC to cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import polars as pl

# Stage outputs (DESIGN.md section 1). Relative to the repository root, where DVC runs stages.
RAW = Path("data/raw")
INTERIM = Path("data/interim")
PROCESSED = Path("data/processed")
MODELS = Path("data/models")
STATE = Path("data/state")  # persist: true resumable training state, keyed by a params hash
METRICS = Path("metrics")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    Works for files and directories. On an exception the temporary is removed and ``path``
    is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_parquet(df: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())
