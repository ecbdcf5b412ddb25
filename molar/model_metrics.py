"""Per-model metric files and their merge into the pipeline's metrics (DESIGN.md section 2).

Each model's evaluation (DVC stage ``evaluate-model@<name>``, one per entry of ``eval.models``)
writes ``<by_model>/<name>/valid.json`` and ``eval.json``: ``{"ndcg@K": ..., "recall@K": ...}``,
and beside them the per-user metrics they average, ``valid_users.parquet`` and ``test_users.parquet``
(one row per evaluated user: user_idx, target, rank, then ndcg@K and recall@K per K; see
:func:`user_metrics_frame`), which the paired significance tests compare (molar/significance.py).
The merge (stage ``evaluate``) reads them for the models of ``eval.models``, in that order, into
``{model: {"ndcg@K": ...}}`` per split; files of models no longer listed are ignored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import polars as pl

from molar.errors import UserError

PART_FILES = {"valid": "valid.json", "test": "eval.json"}  # split -> file name, per model and merged
USER_FILES = {"valid": "valid_users.parquet", "test": "test_users.parquet"}  # split -> per-user metrics, per model
USER_KEYS = ("user_idx", "target", "rank")  # the leading columns of a per-user file; the metric columns follow


def model_dir(by_model: Path, model: str) -> Path:
    return Path(by_model) / model


def user_metrics_frame(
    user_idx: Sequence[int], targets: Sequence[int], ranks: Sequence[int], per_user: Mapping[str, np.ndarray]
) -> pl.DataFrame:
    """One row per evaluated user: user_idx (as in data/processed), target (item_idx), rank (0-based,
    pessimistic ties, as the evaluator counts) and one float64 column per metric of ``per_user``
    (molar.evaluate.per_user_metrics of the same ranks), in its order."""
    columns = {
        "user_idx": pl.Series(list(user_idx), dtype=pl.Int64),
        "target": pl.Series(list(targets), dtype=pl.Int64),
        "rank": pl.Series(np.asarray(ranks, dtype=np.int64), dtype=pl.Int64),
    }
    columns.update({name: pl.Series(np.asarray(v, dtype=np.float64), dtype=pl.Float64) for name, v in per_user.items()})
    lengths = {name: len(col) for name, col in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"per-user columns of different lengths: {lengths}")
    return pl.DataFrame(columns)


def merge_model_metrics(by_model: Path, models: Sequence[str], ks: Sequence[int]) -> dict[str, dict[str, dict[str, float]]]:
    """``{split: {model: metrics}}`` for the splits of ``PART_FILES``, models in the given order.

    Each model's file must hold NDCG@K and Recall@K for every K of ``ks`` (a file without one was
    written for other cut-offs); only those keys are merged, so every model has the same keys.
    """
    expected = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]
    merged: dict[str, dict[str, dict[str, float]]] = {part: {} for part in PART_FILES}
    for model in models:
        for part, name in PART_FILES.items():
            path = model_dir(by_model, model) / name
            if not path.exists():
                raise UserError(f"{path}: no {part} metrics of model {model!r}; run `molar evaluate --model {model}` (or `dvc repro`)")
            metrics = json.loads(path.read_text())
            missing = [key for key in expected if key not in metrics]
            if missing:
                raise UserError(
                    f"{path}: no {', '.join(missing)} (eval.ks is {list(ks)}); rerun `molar evaluate --model {model}`"
                )
            merged[part][model] = {key: metrics[key] for key in expected}  # the evaluator's key order
    return merged


def by_k_csv(test: dict[str, dict[str, float]], ks: Sequence[int]) -> str:
    """Per-K plot data: one row per (model, K), drawn by `dvc plots show` (see dvc.yaml)."""
    lines = ["model,k,ndcg,recall"]
    for name, m in test.items():
        lines += [f"{name},{k},{m[f'ndcg@{k}']:.6f},{m[f'recall@{k}']:.6f}" for k in ks]
    return "\n".join(lines) + "\n"
