"""Run a named experiment set (a paper table) as DVC experiments, then write its report.

`molar experiment table3` runs every run of experiments/table3.yaml not already done, one
`dvc exp run --temp` each (the workspace is left as it is), copies each run's metrics into
reports/table3/runs/<run>/ and writes reports/table3/README.md (`molar report table3`). Give the
same command again after an interruption: finished runs are skipped. With --workspace the runs
are made in the workspace, keeping training state between them (long real-data sets). Sets:
table2, table3 (table3-staged), table4, table5, figure3, appendix-a, fusion, seeds (README:
Experiment sets), or a path to a set file.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from molar.experiments import REPORTS, load_set, parse_set_option, run_set, set_name, set_path
from molar.report import write_report
from stages.common import user_errors


def main(
    name: str = typer.Argument(..., metavar="SET", help="a set name (experiments/SET.yaml) or the path of a set file"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="runs per row (seeds params.seed, +1, ...); default: the set's"),
    set_values: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="override for every run, after the set's (repeatable), e.g. --set train.epochs=3"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"results folder (default {REPORTS}/SET)"),
    rows: List[str] = typer.Option([], "--rows", metavar="ROW", help="run only the runs holding this row (repeatable), named as in the whole set: rows run in two copies of the workspace gather into one runs/ folder"),
    fresh: bool = typer.Option(False, "--fresh", help="rerun runs that are already done"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc exp run commands, run nothing"),
    workspace: bool = typer.Option(False, "--workspace", help="run in the workspace, not temporary copies: training state is kept, so an interrupted run resumes mid-training and unchanged stages are not run again (long real-data sets)"),
) -> None:
    with user_errors():
        path = set_path(name)
        spec, label = load_set(path), set_name(path)
        out = out or REPORTS / label
        command = "molar " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        run_set(path, out, seeds=seeds, extra=parse_set_option(set_values), fresh=fresh, dry_run=dry_run, workspace=workspace, command=command, only=rows, echo=typer.echo)
        if not dry_run:
            write_report(spec, label, out, command)
            typer.echo(f"report: {out / 'README.md'}")
