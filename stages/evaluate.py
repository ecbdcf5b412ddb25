"""Rank the full catalog for every validation and test user; write metrics/valid.json and metrics/eval.json.

Models come from eval.models; each is scored over all items with the user's history masked
(eval.mask_history) and NDCG@K / Recall@K reported for eval.ks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import typer

from molar.config import Params
from molar.data.split import SplitData, load_split
from molar.io import METRICS, PROCESSED, atomic_path, write_json
from stages.common import PARAMS_OPTION, read_params, user_errors

ScoreFn = Callable[[list[list[int]]], torch.Tensor]


def _popularity(split: SplitData, params: Params) -> ScoreFn:
    from molar.models.popularity import Popularity

    return Popularity.fit(split.train, split.n_items).score


# eval.models name -> builder of its score function; each model lives in one molar/models file.
SCORERS: dict[str, Callable[[SplitData, Params], ScoreFn]] = {"popularity": _popularity}


def main(params: Path = PARAMS_OPTION) -> None:
    from molar.evaluate import evaluate_scorer  # imported here so `molar --help` stays fast

    cfg = read_params(params)
    torch.manual_seed(cfg.seed)
    with user_errors():
        split = load_split(PROCESSED)
        unknown = [m for m in cfg.eval.models if m not in SCORERS]
        if unknown:
            raise ValueError(f"eval.models: no scorer for {unknown}; available: {', '.join(SCORERS)}")
        scorers = {name: SCORERS[name](split, cfg) for name in cfg.eval.models}
    results: dict[str, dict] = {"valid": {}, "test": {}}
    for name, score_fn in scorers.items():
        for part, targets in (("valid", split.valid), ("test", split.test)):
            with torch.no_grad():
                results[part][name] = evaluate_scorer(
                    score_fn,
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
