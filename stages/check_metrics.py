"""Check metrics/*.json for CI: values finite and in range, ci.floors met, and (with --against REF) no
metric of metrics/eval.json or metrics/valid.json dropped by more than the tolerance since REF.

Prints one row per check; exit 0: all passed, 1: a check failed, 2: bad params, metrics files or ref.
Not a DVC stage: run it after `dvc repro` (see README, "CI checks of metrics").
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from molar.check_metrics import failed, format_table, run_checks
from molar.io import METRICS
from stages.common import PARAMS_OPTION, read_params, user_errors


def main(
    params: Path = PARAMS_OPTION,
    against: Optional[str] = typer.Option(
        None, "--against", metavar="REF", help="git ref to compare with via `dvc metrics diff` (e.g. origin/main)"
    ),
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance", min=0.0, help="largest allowed absolute drop of a metric since REF (default: ci.tolerance)"
    ),
) -> None:
    cfg = read_params(params)
    with user_errors():
        rows = run_checks(METRICS, cfg.ci, against=against, tolerance=tolerance)
    typer.echo(format_table(rows))
    bad = failed(rows)
    if bad:
        typer.secho(f"check-metrics: {len(bad)} of {len(rows)} checks failed", fg=typer.colors.RED, err=True)
        sys.exit(1)
    typer.echo(f"check-metrics: all {len(rows)} checks passed")
