"""One module per raw data source; each exposes ``read(path, cfg, report) -> (items, interactions)``.

``synthetic`` is the exception: it *generates* data (``generate(cfg, seed, image_dir, report)``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from molar.errors import MissingInputError, UserError

# data.source -> module name under molar.data.readers
READER_MODULES = {
    "synthetic": "synthetic",
    "movielens": "movielens",
    "sasrec-txt": "sasrec_txt",
    "user-seq": "user_seq",
    "recbole": "recbole",
    "amazon": "amazon",
    "pixelrec": "pixelrec",
}


def reader_module(source: str) -> ModuleType:
    if source not in READER_MODULES:
        raise ValueError(f"data.source: unknown source {source!r}; allowed: {', '.join(READER_MODULES)}")
    return importlib.import_module(f"molar.data.readers.{READER_MODULES[source]}")


def resolve_path(source: str, path: str | None) -> Path:
    if not path:
        raise UserError(f"data.path: data.source {source!r} reads files; set data.path to the folder that holds them")
    p = Path(path).expanduser()
    if not p.exists():
        raise MissingInputError(f"data.path: {p} does not exist (data.source {source!r}); point data.path at the raw files")
    return p
