"""What the ML-1M benchmarks share: the pipeline's own split of the data, and one record of a training run."""

from __future__ import annotations

import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Ml1mSplit:
    train: list[list[int]]  # training sequences, by user
    valid_histories: list[list[int]]
    valid_targets: list[int]
    test_histories: list[list[int]]
    test_targets: list[int]
    n_items: int
    stats: dict
    seconds: float  # ingest + split
    items: Any  # the processed items table (polars; item_idx 1..n_items, title, attributes, image_path, ...)


def load_split(params) -> Ml1mSplit:
    """The leave-one-out split of ``params.data`` through the pipeline's ingest and split (molar.config.Params)."""
    from molar.data.ingest import ingest
    from molar.data.split import build_split

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        items, interactions, _ = ingest(params, Path(tmp), Path(tmp))
    tables, stats = build_split(items, interactions, params.split)
    valid, test = tables["valid"].sort("user_idx"), tables["test"].sort("user_idx")
    return Ml1mSplit(
        train=tables["train"].sort("user_idx")["items"].to_list(),
        valid_histories=valid["history"].to_list(),
        valid_targets=valid["target"].to_list(),
        test_histories=test["history"].to_list(),
        test_targets=test["target"].to_list(),
        n_items=tables["items"].height,
        stats=stats,
        seconds=time.perf_counter() - started,
        items=tables["items"].sort("item_idx"),
    )


def fit_record(result, threads: int) -> dict:
    """The numbers every benchmark reports of a ``molar.train.FitResult``, with this process's peak memory."""
    epoch_seconds = [r["seconds"] for r in result.history]
    return {
        "best_valid_ndcg@10": result.best_metric,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "seconds_per_epoch": sum(epoch_seconds) / len(epoch_seconds),
        "train_seconds": sum(epoch_seconds),
        "resumed": result.resumed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": threads,
        "load_average_15min": os.getloadavg()[2],  # at the end; above ``threads``, other work shared the cores
        "history": result.history,
    }
