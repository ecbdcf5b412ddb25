"""Helpers every stage shares: the --params option, clean exits for user errors, and getting the
outputs ready before the work starts."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from molar.config import Params, load_params
from molar.errors import MissingInputError, UserError
from molar.io import sweep_temps

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read (DVC passes params.yaml)")


@contextmanager
def user_errors():
    """Print a clean one-paragraph message for errors caused by inputs (``UserError``), exit 2.

    Anything else is a bug in our code: it propagates with its traceback (exit 1).
    """
    try:
        yield
    except UserError as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def read_params(path: Path) -> Params:
    with user_errors():
        return load_params(path)


def prepare_outputs(*paths: Path) -> None:
    """Call first in a stage with every output it writes: each output's folder is created and must
    be writable (else a clean error now, not a traceback after the work), and the temporaries an
    interrupted earlier run left beside these outputs are removed (only theirs: molar.io.sweep_temps)."""
    with user_errors():
        for folder in dict.fromkeys(Path(p).parent for p in paths):
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise UserError(f"{folder}/: cannot create this output folder ({err.strerror}); "
                                "remove what is in the way or run from a folder you can write to") from None
            if not os.access(folder, os.W_OK | os.X_OK):
                raise UserError(f"{folder}/: output folder is not writable; fix its permissions "
                                "or run from a folder you can write to")
    for path in paths:
        for stale in sweep_temps(path):
            typer.echo(f"removed {stale}, left by an interrupted run", err=True)


def require_input(path: Path, made_by: str) -> Path:
    """``path`` if it exists, else an error saying which stage makes it."""
    if not path.exists():
        raise MissingInputError(f"{path}: missing; run `molar {made_by}` first (or `dvc repro`)")
    return path


def use_threads(cfg: Params) -> int:
    """Apply the ``threads`` param to torch (0 keeps torch's own choice); return the count in use.

    Results are bit-reproducible for one thread count only (reductions split differently), so the
    training stages record it in their metrics.
    """
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.get_num_threads()
