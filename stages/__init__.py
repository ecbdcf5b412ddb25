"""The ``molar`` command line: one subcommand per DVC stage (see dvc.yaml), plus ``recommend``, ``check-metrics``, ``significance``, ``experiment`` and ``report``."""

from __future__ import annotations

import typer

from stages import (
    check_metrics,
    evaluate,
    experiment,
    ingest,
    item_content,
    recommend,
    report,
    sft_data,
    significance,
    split,
    train_mirm,
    train_id,
    train_late_fusion,
    train_molar,
    train_popularity,
)

app = typer.Typer(
    name="molar",
    help="Molar pipeline stages. Each reads params.yaml (or --params) and writes its DVC outputs atomically.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# in pipeline order (dvc.yaml runs them as `molar <name>`)
for name, module in (
    ("ingest", ingest),
    ("split", split),
    ("sft-data", sft_data),
    ("train-mirm", train_mirm),
    ("item-content", item_content),
    ("train-id", train_id),
    ("train-molar", train_molar),
    ("train-popularity", train_popularity),
    ("train-late-fusion", train_late_fusion),
    ("evaluate", evaluate),
    ("recommend", recommend),
    ("check-metrics", check_metrics),
    ("significance", significance),
    ("experiment", experiment),
    ("report", report),
):
    app.command(name, help=module.__doc__)(module.main)
