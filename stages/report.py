"""Write the report of an experiment set from its collected runs, or the gallery of recommendations.

`molar report SET` reads reports/SET/runs/ (made by `molar experiment SET`) and the set file, and
writes reports/SET/README.md (the paper-style table, best bold and second underlined, paired
tests against the set's reference row), table.csv and by_k.png; nothing is retrained.
`molar report gallery` writes reports/gallery/index.html: sample test users, their last items
and each trained model's top-K (of eval.models), with item images, the true next item marked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from molar.experiments import REPORTS, load_set, set_name, set_path
from molar.report import write_report
from stages.common import PARAMS_OPTION, read_params, use_threads, user_errors


def main(
    name: str = typer.Argument(..., metavar="SET", help="a set name (experiments/SET.yaml), a set file, or gallery"),
    out: Optional[Path] = typer.Option(None, "--out", help=f"folder of the runs and the report (default {REPORTS}/SET)"),
    params: Path = PARAMS_OPTION,
    users: int = typer.Option(6, "--users", help="gallery: test users shown"),
    k: int = typer.Option(10, "--k", help="gallery: items per model"),
    models: Optional[str] = typer.Option(None, "--models", help="gallery: comma-separated models (default: eval.models)"),
) -> None:
    if name == "gallery":
        _gallery(params, out or REPORTS / "gallery", users, k, models)
        return
    with user_errors():
        path = set_path(name)
        label = set_name(path)
        out = out or REPORTS / label
        write_report(load_set(path), label, out)
    typer.echo(f"report: {out / 'README.md'}")


def _gallery(params: Path, out: Path, users: int, k: int, models: Optional[str]) -> None:
    import torch

    from molar.data.split import load_split
    from molar.gallery import write_gallery
    from molar.io import PROCESSED
    from stages.evaluate import scorer_builder

    cfg = read_params(params)
    use_threads(cfg)
    names = [m.strip() for m in models.split(",") if m.strip()] if models else list(cfg.eval.models)
    with user_errors(), torch.no_grad():
        split = load_split(PROCESSED)
        scorers = {m: scorer_builder(m)(split, cfg)("test") for m in names}
        index = write_gallery(split, scorers, out, image_root=Path("."), n_users=users, k=k,
                              mask_history=cfg.eval.mask_history, seed=cfg.seed)
    typer.echo(f"gallery: {index}")
