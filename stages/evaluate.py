"""Rank the full catalog for every validation and test user; write metrics/valid.json and metrics/eval.json.

Models come from eval.models; each is scored over all items with the user's history masked
(eval.mask_history) and NDCG@K / Recall@K reported for eval.ks.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import typer

from molar.config import Params
from molar.data.split import SplitData, Targets, load_split
from molar.io import METRICS, MODELS, PROCESSED, atomic_path, write_json
from molar.errors import UserError
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, use_threads, user_errors

if TYPE_CHECKING:  # torch loads only when a stage runs: `molar --help` stays fast
    import torch

ScoreFn = Callable[[list[list[int]]], "torch.Tensor"]


ScorerFor = Callable[[Targets], ScoreFn]  # the score function to rank one split (valid or test) with


def _popularity(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.popularity import Popularity

    # counted over the histories of the split being ranked: for test these include the
    # validation targets, which the model may know at that point in time
    return lambda part: Popularity.fit(part.histories, split.n_items).score


def _sasrec(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.sasrec import load_scorer

    score_fn = load_scorer(MODELS / "sasrec")
    return lambda part: score_fn


def _molar(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.molar import load_scorer

    score_fn = load_scorer(MODELS / "molar")
    return lambda part: score_fn


# eval.models name -> builder of its scorer; each model lives in one molar/models file.
SCORERS: dict[str, Callable[[SplitData, Params], ScorerFor]] = {
    "popularity": _popularity,
    "sasrec": _sasrec,
    "molar": _molar,
}


def main(params: Path = PARAMS_OPTION) -> None:
    import torch

    from molar.evaluate import evaluate_scorer  # imported here so `molar --help` stays fast

    cfg = read_params(params)
    prepare_outputs(METRICS / "valid.json", METRICS / "eval.json", METRICS / "eval_by_k.csv")
    use_threads(cfg)
    torch.manual_seed(cfg.seed)
    with user_errors():
        split = load_split(PROCESSED)
        unknown = [m for m in cfg.eval.models if m not in SCORERS]
        if unknown:
            raise UserError(f"eval.models: no scorer for {unknown}; available: {', '.join(SCORERS)}")
    results: dict[str, dict] = {"valid": {}, "test": {}}
    for name in cfg.eval.models:
        with user_errors():
            scorer_for = SCORERS[name](split, cfg)
        for part, targets in (("valid", split.valid), ("test", split.test)):
            results[part][name] = evaluate_scorer(
                scorer_for(targets),
                targets.histories,
                targets.targets,
                split.n_items,
                ks=cfg.eval.ks,
                mask_history=cfg.eval.mask_history,
                chunk_size=cfg.eval.user_chunk_size,
            )
            typer.echo(f"{part:5s} {name:12s} " + "  ".join(f"{k}={v:.4f}" for k, v in results[part][name].items()))
    write_json(results["valid"], METRICS / "valid.json")
    write_json(results["test"], METRICS / "eval.json")
    # per-K plot data: one row per (model, K), drawn by `dvc plots show` (see dvc.yaml)
    with atomic_path(METRICS / "eval_by_k.csv") as tmp:
        lines = ["model,k,ndcg,recall"]
        for name, m in results["test"].items():
            lines += [f"{name},{k},{m[f'ndcg@{k}']:.6f},{m[f'recall@{k}']:.6f}" for k in cfg.eval.ks]
        tmp.write_text("\n".join(lines) + "\n")
