"""Paired significance tests over users of each --models entry against --against REF on one per-user metric,
from metrics/by_model/NAME/test_users.parquet (written by `molar evaluate --model NAME`).

Prints one row per model: its mean, the mean difference to REF, the paired t-test, Wilcoxon
signed-rank and sign test p-values (two-sided; molar/significance.py says how each is computed) and
the number of users. Not a DVC stage: run it after `dvc repro`. Exit 2: a file or metric is missing,
or the models were evaluated on different users.
"""

from __future__ import annotations

import typer

from molar.model_metrics import USER_FILES
from molar.significance import BY_MODEL, compare, format_table
from stages.common import user_errors


def main(
    models: str = typer.Option(..., "--models", help="comma-separated model names, e.g. sasrec,gru4rec,molar"),
    against: str = typer.Option(..., "--against", metavar="REF", help="the reference model, e.g. sasrec"),
    metric: str = typer.Option("ndcg@10", "--metric", help="per-user metric column, e.g. ndcg@10 or recall@20"),
    part: str = typer.Option("test", "--part", help=f"split: {' or '.join(USER_FILES)}"),
) -> None:
    names = [m.strip() for m in models.split(",") if m.strip()]
    with user_errors():
        rows = compare(names, against, metric, BY_MODEL, part)
    typer.echo(format_table(rows, against, metric))
