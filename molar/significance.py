"""Paired significance tests over users between two models' per-user metrics.

`molar evaluate --model NAME` writes, beside metrics/by_model/NAME/eval.json, the per-user metrics it
averages (metrics/by_model/NAME/test_users.parquet, molar/model_metrics.py). Two models evaluated on
the same split rank the same users, so their metrics pair up by user_idx, and a difference between
the models can be tested on the per-user differences d = a - b:

- paired t-test (two-sided): t = mean(d) / (sd(d) / sqrt(n)), sd with n - 1 degrees of freedom,
  p from Student's t with n - 1 df (scipy.stats.ttest_rel).
- Wilcoxon signed-rank (two-sided), zero differences dropped first (scipy's default
  ``zero_method="wilcox"``), ``method="auto"``: the exact null distribution when no zero or tied
  differences remain and n <= 50, the normal approximation otherwise (scipy.stats.wilcoxon).
- sign test (two-sided, exact binomial): zero differences dropped, the number of positive ones
  against Binomial(n_nonzero, 1/2) (scipy.stats.binomtest).

By definition every p is 1.0 (and t_stat 0.0) when all differences are zero (a model against
itself, or two models that rank every user's target alike): there is no evidence of a difference,
while the formulas above are 0/0 there. When the differences are non-zero but all equal, sd(d) = 0
and the t-test gives t = +-inf and p = 0, as scipy does.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from molar.errors import MissingInputError, UserError
from molar.io import METRICS
from molar.model_metrics import USER_FILES, USER_KEYS, model_dir

BY_MODEL = METRICS / "by_model"
TEST_KEYS = ("mean_diff", "t_stat", "t_p", "wilcoxon_p", "sign_p", "n")  # what paired_tests returns


class SignificanceError(UserError):
    """Per-user metrics that cannot be paired: other users, an unknown metric, too few users."""


def paired_tests(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """The paired t-test, Wilcoxon signed-rank and sign test of ``a`` against ``b`` (see the module docstring).

    ``a`` and ``b`` hold one value per user, the same users in the same order (:func:`paired_metric`
    aligns two per-user files). Returns ``{"mean_diff": mean(a - b), "t_stat", "t_p", "wilcoxon_p",
    "sign_p", "n": users}``.
    """
    from scipy import stats  # loads here, not at `molar --help`

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 1 or b.ndim != 1 or a.shape != b.shape:
        raise SignificanceError(
            f"paired tests need one value per user in both vectors, for the same users; got shapes {a.shape} and {b.shape}"
        )
    n = a.shape[0]
    if n < 2:
        raise SignificanceError(f"paired tests need at least 2 users, got {n}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise SignificanceError("per-user metrics hold NaN or inf; rerun `molar evaluate`")
    d = a - b
    out = {"mean_diff": float(d.mean()), "n": n}
    nonzero = d[d != 0]
    if nonzero.size == 0:  # identical: no evidence of a difference, by definition (module docstring)
        return {**out, "t_stat": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0, "sign_p": 1.0}
    with warnings.catch_warnings():  # constant differences: scipy warns about precision, then returns inf / 0
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_rel(a, b)
    wilcoxon = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
    sign = stats.binomtest(int((nonzero > 0).sum()), int(nonzero.size), 0.5, alternative="two-sided")
    out.update(t_stat=float(t.statistic), t_p=float(t.pvalue), wilcoxon_p=float(wilcoxon.pvalue), sign_p=float(sign.pvalue))
    return {key: out[key] for key in TEST_KEYS}


def load_user_metrics(by_model_dir: str | Path, model: str, part: str = "test") -> pl.DataFrame:
    """The per-user metrics `molar evaluate --model MODEL` wrote for split ``part`` (valid or test)."""
    if part not in USER_FILES:
        raise SignificanceError(f"part {part!r}: give one of {', '.join(USER_FILES)}")
    path = model_dir(Path(by_model_dir), model) / USER_FILES[part]
    if not path.is_file():
        raise MissingInputError(f"{path}: no per-user {part} metrics of model {model!r}; run `molar evaluate --model {model}` (or `dvc repro`)")
    return pl.read_parquet(path)


def paired_metric(a: pl.DataFrame, b: pl.DataFrame, metric: str, names: tuple[str, str] = ("a", "b")) -> tuple[np.ndarray, np.ndarray]:
    """Column ``metric`` of two per-user frames, aligned by user_idx (sorted); a SignificanceError
    naming the models (``names``) when their users differ or the metric is missing."""
    for frame, name in zip((a, b), names):
        if metric not in frame.columns or metric in USER_KEYS:
            metrics = [c for c in frame.columns if c not in USER_KEYS]
            raise SignificanceError(f"model {name!r} has no per-user metric {metric!r}; it has {', '.join(metrics)}")
        if frame["user_idx"].n_unique() != frame.height:
            raise SignificanceError(f"model {name!r}: a user_idx appears twice in its per-user metrics; rerun `molar evaluate --model {name}`")
    a = a.select("user_idx", metric).sort("user_idx")
    b = b.select("user_idx", metric).sort("user_idx")
    if a.height != b.height or not a["user_idx"].equals(b["user_idx"]):
        only_a = a.height - a.join(b, on="user_idx", how="semi").height
        only_b = b.height - b.join(a, on="user_idx", how="semi").height
        raise SignificanceError(
            f"models {names[0]!r} and {names[1]!r} were evaluated on different users ({only_a} only in "
            f"{names[0]!r}, {only_b} only in {names[1]!r}); evaluate both on the same data/processed "
            f"(`molar evaluate --model NAME` for each)"
        )
    return a[metric].to_numpy(), b[metric].to_numpy()


def compare(
    models: Sequence[str], reference: str, metric: str = "ndcg@10", by_model_dir: str | Path = BY_MODEL, part: str = "test"
) -> list[dict]:
    """One row per model of ``models``: ``{"model", "mean", "reference_mean", **paired_tests(model, reference)}``
    on per-user ``metric``; ``mean_diff`` is model minus reference. The reference against itself gives p = 1."""
    ref = load_user_metrics(by_model_dir, reference, part)
    rows = []
    for model in models:
        a, b = paired_metric(load_user_metrics(by_model_dir, model, part), ref, metric, (model, reference))
        rows.append({"model": model, "mean": float(a.mean()), "reference_mean": float(b.mean()), **paired_tests(a, b)})
    return rows


def format_table(rows: list[dict], reference: str, metric: str) -> str:
    """The rows of :func:`compare` as an aligned text table."""
    header = ["model", metric, f"diff vs {reference}", "t", "t_p", "wilcoxon_p", "sign_p", "users"]
    lines = [header]
    for r in rows:
        t = r["t_stat"]
        lines.append([
            r["model"], f"{r['mean']:.4f}", f"{r['mean_diff']:+.4f}", f"{t:.3f}" if math.isfinite(t) else str(t),
            f"{r['t_p']:.4g}", f"{r['wilcoxon_p']:.4g}", f"{r['sign_p']:.4g}", str(r["n"]),
        ])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
