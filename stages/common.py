"""Helpers every stage shares: the --params option and turning known errors into clean exits."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import typer

from molar.config import Params, ParamsError, load_params
from molar.data.schema import BadInputError

PARAMS_OPTION = typer.Option(Path("params.yaml"), "--params", "-p", help="params file to read (DVC passes params.yaml)")


@contextmanager
def user_errors():
    """Print a clean one-paragraph message for errors caused by inputs, not by our code."""
    try:
        yield
    except (ParamsError, BadInputError, FileNotFoundError, ValueError) as err:
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(2)


def read_params(path: Path) -> Params:
    with user_errors():
        return load_params(path)
