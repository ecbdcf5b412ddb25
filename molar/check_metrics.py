"""CI checks of the metric files: ranges, floors (``ci`` in params.yaml) and regressions against a git ref.

Three kinds of check, each one row of the table ``molar check-metrics`` prints:

- range: every value of the ranking files (metrics/eval.json, metrics/valid.json, keyed by model) is a
  finite number in [0, 1]; every number in the other metrics/**/*.json files (counts, losses, timings:
  no common range) is finite.
- floor: on metrics/eval.json, for each model of ``ci.floors`` and each metric of ``ci.metrics``, the
  value is above ``max(min, factor x the over model's value)``. A floor whose model, over model or metric
  is not in the file is skipped (``eval.models`` may leave models out), not failed.
- regression: against a git ref, from ``dvc metrics diff --json`` over the ranking files: a key (model
  and metric) that dropped by more than the tolerance (absolute) fails; a key missing at the ref is new,
  one missing now is removed; neither fails.

The check functions are pure (parsed JSON in, rows out); ``run_checks`` reads the files and calls DVC.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from molar.config import CiParams
from molar.errors import UserError

RANKING_FILES = ("eval.json", "valid.json")  # keyed by model; every value a ranking metric in [0, 1]
FLOORS_FILE = "eval.json"  # floors are judged on the test split

PASS, FAIL, SKIPPED, NEW, REMOVED = "pass", "FAIL", "skipped", "new", "removed"


class CheckMetricsError(UserError):
    """Metrics files, a git ref or a DVC repository that cannot be checked as given."""


@dataclass(frozen=True)
class Row:
    check: str  # range | floor | regression
    file: str
    model: str
    metric: str
    value: float | None
    bound: str  # what it was held against: "[0, 1]", "> 0.2084 (2 x popularity)", ">= 0.4141 (main 0.4241 - 0.01)"
    verdict: str  # PASS, FAIL, SKIPPED, NEW or REMOVED; only FAIL fails the run


def failed(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.verdict == FAIL]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _number_or_none(v) -> float | None:
    return v if _is_number(v) else None


def ranking_metrics(name: str, data) -> dict[str, dict]:
    """``data`` as {model: {metric: value}}, or a CheckMetricsError naming the file."""
    if not isinstance(data, dict) or not all(isinstance(m, dict) for m in data.values()):
        raise CheckMetricsError(
            f"{name}: expected {{model: {{metric: value}}}} as `molar evaluate` writes it; rerun `dvc repro`"
        )
    return data


def range_checks(name: str, metrics: dict[str, dict]) -> list[Row]:
    """One row per value of a ranking file: finite and in [0, 1]."""
    rows = []
    for model, values in metrics.items():
        for metric, v in values.items():
            ok = _is_number(v) and math.isfinite(v) and 0.0 <= v <= 1.0
            rows.append(Row("range", name, model, metric, _number_or_none(v), "[0, 1]", PASS if ok else FAIL))
    return rows


def _numbers(data, path: str = ""):
    """(dotted key, value) of every number in nested JSON."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _numbers(v, f"{path}.{k}" if path else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _numbers(v, f"{path}.{i}" if path else str(i))
    elif _is_number(data):
        yield path, data


def finite_check(name: str, data) -> Row:
    """One row for a non-ranking metrics file: all its numbers finite (the bad keys named if not)."""
    numbers = list(_numbers(data))
    bad = [key for key, v in numbers if not math.isfinite(v)]
    metric = ", ".join(bad) if bad else f"all {len(numbers)} numbers"
    return Row("range", name, "-", metric, None, "finite", FAIL if bad else PASS)


def floor_checks(metrics: dict[str, dict], ci: CiParams, name: str = FLOORS_FILE) -> list[Row]:
    """One row per (floor model, ci.metrics metric) on the parsed metrics/eval.json."""
    rows = []
    for model, floor in ci.floors.items():
        for metric in ci.metrics:
            # a value that is not a number counts as missing here: its range check already fails
            value = _number_or_none(metrics.get(model, {}).get(metric))
            base = _number_or_none(metrics.get(floor.over, {}).get(metric)) if floor.over else None
            missing = [m for m, v in ((model, value), (floor.over, base)) if m and v is None]
            if missing:
                where = " and ".join(sorted(set(missing)))
                rows.append(Row("floor", name, model, metric, value, f"no {metric} of {where}", SKIPPED))
                continue
            bound, why = floor.min, f"min {floor.min:g}"
            if floor.over and floor.factor * base > bound:
                bound, why = floor.factor * base, f"{floor.factor:g} x {floor.over}"
            ok = value > bound
            rows.append(Row("floor", name, model, metric, value, f"> {bound:.4f} ({why})", PASS if ok else FAIL))
    return rows


def regression_checks(diff: dict[str, dict], ref: str, tolerance: float) -> list[Row]:
    """One row per key of ``dvc metrics diff --json --all`` output ({file: {"model.metric": {old, new, diff}}})."""
    rows = []
    for file, keys in sorted(diff.items()):
        for key, change in sorted(keys.items()):
            model, _, metric = key.partition(".")
            # a non-number reads as absent (the range checks fail it), so both present means DVC gave a diff
            old, new = _number_or_none(change.get("old")), _number_or_none(change.get("new"))
            if old is None:
                rows.append(Row("regression", Path(file).name, model, metric, new, f"not at {ref}", NEW))
            elif new is None:
                rows.append(Row("regression", Path(file).name, model, metric, None, f"{ref} {old:.4f}", REMOVED))
            else:
                verdict = FAIL if -change["diff"] > tolerance else PASS
                bound = f">= {old - tolerance:.4f} ({ref} {old:.4f} - {tolerance:g})"
                rows.append(Row("regression", Path(file).name, model, metric, new, bound, verdict))
    return rows


def dvc_metrics_diff(ref: str, targets: list[str]) -> dict[str, dict]:
    """``dvc metrics diff --json --all REF`` (workspace side: the files as they are now), parsed."""
    cmd = [sys.executable, "-m", "dvc", "metrics", "diff", "--json", "--all", "--targets", *targets, "--", ref]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        said = " ".join(line for line in proc.stderr.splitlines() if line.startswith("ERROR")) or proc.stderr.strip()
        raise CheckMetricsError(
            f"--against {ref}: `dvc metrics diff` failed: {said}\n"
            "The ref must be a commit, branch or tag of this git repository (in CI, fetch it first: "
            "`git fetch origin main`, or check out with full history)."
        )
    return json.loads(proc.stdout or "{}")


def read_metrics_dir(metrics_dir: Path) -> dict[str, object]:
    """Every metrics/**/*.json, parsed, by path relative to ``metrics_dir``; the ranking files must exist."""
    missing = [n for n in RANKING_FILES if not (metrics_dir / n).is_file()]
    if missing:
        raise CheckMetricsError(
            f"{', '.join(str(metrics_dir / n) for n in missing)}: no such file (run `dvc repro` first, "
            "from the repository root)"
        )
    parsed = {}
    for path in sorted(metrics_dir.rglob("*.json")):
        try:
            parsed[path.relative_to(metrics_dir).as_posix()] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CheckMetricsError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
    return parsed


def run_checks(
    metrics_dir: Path, ci: CiParams, against: str | None = None, tolerance: float | None = None
) -> list[Row]:
    """All checks on ``metrics_dir``: ranges and floors; regressions too when ``against`` names a git ref."""
    if tolerance is not None and against is None:
        raise CheckMetricsError("--tolerance applies to --against REF only; give a ref or drop --tolerance")
    files = read_metrics_dir(metrics_dir)
    ranking = {name: ranking_metrics(str(metrics_dir / name), files.pop(name)) for name in RANKING_FILES}
    rows: list[Row] = []
    for name, metrics in ranking.items():
        rows += range_checks(name, metrics)
    rows += [finite_check(name, data) for name, data in files.items()]
    rows += floor_checks(ranking[FLOORS_FILE], ci)
    if against is not None:
        diff = dvc_metrics_diff(against, [str(metrics_dir / n) for n in RANKING_FILES])
        rows += regression_checks(diff, against, ci.tolerance if tolerance is None else tolerance)
    return rows


def format_table(rows: list[Row]) -> str:
    header = ("check", "file", "model", "metric", "value", "floor / ref", "verdict")
    cells = [header] + [
        (r.check, r.file, r.model, r.metric, "-" if r.value is None else f"{r.value:.4f}", r.bound, r.verdict)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)
