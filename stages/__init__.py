"""The ``molar`` command line: one subcommand per DVC stage (see dvc.yaml)."""

from __future__ import annotations

import typer

from stages import evaluate, ingest, split

app = typer.Typer(
    name="molar",
    help="Molar pipeline stages. Each reads params.yaml (or --params) and writes its DVC outputs atomically.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("ingest", help=ingest.__doc__)(ingest.main)
app.command("split", help=split.__doc__)(split.main)
app.command("evaluate", help=evaluate.__doc__)(evaluate.main)
