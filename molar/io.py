"""Atomic output writers and the pipeline's file locations.

Every stage output is written to a temporary sibling and renamed into place, so an interrupted
stage never leaves a half-written file for DVC to cache. A kill -9 can still leave the temporary
sibling itself; ``sweep_temps`` removes those of one output (each stage calls it on its own outputs
before it starts, stages/common.py:prepare_outputs).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))  # see _is_temp_of
    target = tmp / path.name
    try:
        yield target
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_temp_of(path: Path, name: str) -> bool:
    """Whether ``name`` is a temporary sibling ``atomic_path(path)`` makes: ``.<name>.<random>.tmp``.

    The random part (from mkdtemp) has no dot, so the temporary of ``eval.json.bak`` is never taken
    for one of ``eval.json``.
    """
    return re.fullmatch(rf"\.{re.escape(path.name)}\.[^.]+\.tmp", name) is not None


def sweep_temps(path: str | Path) -> list[Path]:
    """Remove the temporary siblings an interrupted ``atomic_path(path)`` left; return them.

    Only ``path``'s own temporaries go, nothing else in its folder. Call it before writing ``path``,
    never while another process may be writing it.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    stale = sorted(p for p in path.parent.iterdir() if _is_temp_of(path, p.name))
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)  # another process of the same stage may have swept it first
    return stale


def write_parquet(df: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        df.write_parquet(tmp)


def write_json(obj, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


def write_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> torch tensor) as one safetensors file, atomically and byte-identical
    for equal inputs.

    safetensors writes its JSON header (``__metadata__`` and the tensor entries) from a hash map, so
    the key order, and the file's bytes, change from one write to the next; DVC hashes bytes, and
    would rerun every stage downstream of an unchanged file. The header is re-serialized compactly,
    as safetensors does, with its keys sorted, and padded with spaces to a multiple of 8 bytes (the
    alignment the format requires); the tensor bytes follow unchanged, their offsets being relative
    to the end of the header.
    """
    # torch loads here, not when a stage module is imported
    from safetensors.torch import save

    data = save({name: t.contiguous() for name, t in tensors.items()}, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(memoryview(data)[8 + n :])  # no copy of the tensor bytes


_HASH_CHUNK = 8 << 20


def checkpoint_key(directory: str | Path) -> str:
    """Content hash of a checkpoint directory (every file's relative path and bytes)."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode() + b"\x00")
        with open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()
