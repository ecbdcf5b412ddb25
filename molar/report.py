"""`molar report SET`: the paper-style table, plot and significance tests of a set's collected runs.

Reads only what `molar experiment SET` collected (<out>/runs/<run>/: run.json, params.yaml,
metrics/eval.json and metrics/by_model/<model>/test_users.parquet; molar/experiments.py) and the
set file (row order, labels, reference). Writes into <out>/:

- README.md: the table (one column per NDCG@K and Recall@K of eval.ks; the best value of a
  column in bold, the second underlined, compared as shown: to 4 decimals), the paired tests of
  every row against the reference row, the plot and the runs with their overrides;
- table.csv: the same numbers, unrounded, one line per row;
- by_k.png: NDCG@K and Recall@K over K, one line per row.

Seeds: a cell is the mean over the row's seeds, with the half width of the 95% confidence
interval of that mean (Student's t, seeds - 1 degrees of freedom) after a +-. The paired tests
(molar/significance.py: paired t-test, Wilcoxon signed-rank, sign test; two-sided) compare a
row with the reference on the first K's NDCG per user. Over seeds, when every seed evaluated the
same users with the same targets (a real data set: the split does not depend on the seed), each
user's metric is first averaged over the seeds; when the data themselves change with the seed
(the synthetic default), the units are the (seed, user) pairs. A star marks t-test p < 0.05.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from ruamel.yaml import YAML

from molar.errors import MissingInputError
from molar.experiments import RUN_FILE, ExperimentError, ExperimentSet, Row
from molar.io import atomic_path
from molar.significance import paired_metric, paired_tests

SIGNIFICANCE_LEVEL = 0.05  # the star's threshold on the paired t-test's p


@dataclass
class CollectedRun:
    name: str
    dir: Path
    record: dict
    params: dict
    metrics: dict  # metrics/eval.json: {model: {"ndcg@K": ...}}

    def users(self, model: str) -> pl.DataFrame:
        path = self.dir / "metrics" / "by_model" / model / "test_users.parquet"
        if not path.is_file():
            raise MissingInputError(f"{path}: missing; the run {self.name} did not evaluate {model!r} (rerun the set with --fresh)")
        return pl.read_parquet(path)


@dataclass
class RowResult:
    row: Row
    runs: list[CollectedRun] = field(default_factory=list)  # one per seed, in seed order

    def values(self, metric: str) -> list[float]:
        return [r.metrics[self.row.model][metric] for r in self.runs]


def load_runs(out: Path) -> list[CollectedRun]:
    """Every complete run under <out>/runs/ (those with a run.json), by name."""
    runs = []
    for run_json in sorted((out / "runs").glob(f"*/{RUN_FILE}")):
        run_dir = run_json.parent
        eval_path = run_dir / "metrics" / "eval.json"
        if not eval_path.is_file():
            raise MissingInputError(f"{eval_path}: missing in a collected run; rerun the set with --fresh")
        runs.append(CollectedRun(
            name=run_dir.name, dir=run_dir, record=json.loads(run_json.read_text()),
            params=YAML(typ="safe").load((run_dir / "params.yaml").read_text()) or {},
            metrics=json.loads(eval_path.read_text()),
        ))
    return runs


def gather(spec: ExperimentSet, runs: list[CollectedRun]) -> list[RowResult]:
    """Each row of the set with the runs that hold it (run.json lists its rows), one per seed."""
    results = []
    for row in spec.rows:
        by_seed: dict[int | None, CollectedRun] = {}
        for run in runs:
            if row.name in run.record.get("rows", []) and row.model in run.metrics:
                seed = run.record.get("overrides", {}).get("seed")
                older = by_seed.get(seed)
                if older is None or run.record.get("collected", "") > older.record.get("collected", ""):
                    by_seed[seed] = run  # a row renamed or rerun since: the newest collection wins
        results.append(RowResult(row, [by_seed[s] for s in sorted(by_seed, key=lambda s: (s is not None, s or 0))]))
    return results


def eval_ks(results: list[RowResult]) -> list[int]:
    """eval.ks of the runs, which must agree: the table's K columns."""
    seen = {}
    for result in results:
        for run in result.runs:
            seen.setdefault(tuple(run.params.get("eval", {}).get("ks", [])), run.name)
    if len(seen) > 1:
        detail = "; ".join(f"{list(ks)} in {name}" for ks, name in seen.items())
        raise ExperimentError(f"the runs were evaluated at different eval.ks ({detail}); rerun the set with one eval.ks")
    if not seen:
        raise ExperimentError("no collected runs; run `molar experiment SET` first")
    return list(next(iter(seen)))


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and the half width of its 95% confidence interval (None for one value)."""
    from scipy import stats

    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, None
    return mean, float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def paired_units(result: RowResult, reference: RowResult, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-user ``metric`` of a row and the reference, paired (module docstring: seeds)."""
    ref_by_seed = {r.record.get("overrides", {}).get("seed"): r for r in reference.runs}
    pairs, targets = [], []
    for run in result.runs:
        seed = run.record.get("overrides", {}).get("seed")
        if seed not in ref_by_seed:
            continue
        ref_users = ref_by_seed[seed].users(reference.row.model)
        pairs.append(paired_metric(run.users(result.row.model), ref_users, metric, (result.row.name, reference.row.name)))
        targets.append(ref_users.sort("user_idx").select("user_idx", "target"))
    if not pairs:
        raise ExperimentError(f"rows {result.row.name!r} and {reference.row.name!r} share no seed; run both with the same seeds")
    if all(t.equals(targets[0]) for t in targets):  # the same split in every seed: average each user
        return np.mean([a for a, _ in pairs], axis=0), np.mean([b for _, b in pairs], axis=0)
    return np.concatenate([a for a, _ in pairs]), np.concatenate([b for _, b in pairs])


def marks(values: list[float | None]) -> list[str]:
    """'best', 'second' or '' per value, on the values as shown (4 decimals)."""
    shown = [round(v, 4) if v is not None else None for v in values]
    distinct = sorted({v for v in shown if v is not None}, reverse=True)
    best = distinct[0] if distinct else None
    second = distinct[1] if len(distinct) > 1 else None
    return ["best" if v is not None and v == best else "second" if v is not None and v == second else "" for v in shown]


def _cell(mean: float | None, ci: float | None, mark: str) -> str:
    if mean is None:
        return "not run"
    text = f"{mean:.4f}" + (f" ± {ci:.4f}" if ci is not None else "")
    return f"**{text}**" if mark == "best" else f"<u>{text}</u>" if mark == "second" else text


def _p(value: float) -> str:
    return f"{value:.3g}" if value >= 1e-4 else f"{value:.1e}"


def build_report(spec: ExperimentSet, set_name: str, out: Path, command: str = "", runs: list[CollectedRun] | None = None) -> dict:
    """Compute every number of the report: ``{"ks", "metrics", "rows": [...]}`` (one dict per row),
    from ``runs`` (default: the runs collected in ``out``)."""
    results = gather(spec, load_runs(out) if runs is None else runs)
    ks = eval_ks(results)
    metric_names = [f"{m}@{k}" for k in ks for m in ("ndcg", "recall")]
    test_metric = f"ndcg@{ks[0]}"
    reference = next(r for r in results if r.row.name == spec.reference)
    rows = []
    for result in results:
        entry = {"name": result.row.name, "label": result.row.shown, "model": result.row.model, "seeds": len(result.runs), "runs": [r.name for r in result.runs]}
        for metric in metric_names:
            mean, ci = mean_ci(result.values(metric)) if result.runs else (None, None)
            entry[metric], entry[f"{metric}_ci95"] = mean, ci
        if result.runs and reference.runs:
            a, b = paired_units(result, reference, test_metric)
            entry["test"] = paired_tests(a, b)
        rows.append(entry)
    for metric in metric_names:
        for entry, mark in zip(rows, marks([e[metric] for e in rows])):
            entry[f"{metric}_mark"] = mark
    return {"set": set_name, "title": spec.title, "reference": spec.reference, "ks": ks, "metrics": metric_names,
            "test_metric": test_metric, "rows": rows, "command": command, "notes": spec.notes}


def markdown(report: dict, runs: list[CollectedRun]) -> str:
    metrics, test_metric = report["metrics"], report["test_metric"]
    ref_label = next(r["label"] for r in report["rows"] if r["name"] == report["reference"])
    head = ["Model", *(m.replace("ndcg", "NDCG").replace("recall", "Recall") for m in metrics)]
    lines = [f"# {report['title']}", ""]
    if report["command"]:
        lines += [f"Made by `{report['command']}` (runs and their params: [runs/](runs/)); this page by `molar report {report['set']}`.", ""]
    elif runs:
        lines += [f"Made by the commands of the runs below (runs and their params: [runs/](runs/)); this page by `molar report {report['set']}`.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        cells = [_cell(r[m], r[f"{m}_ci95"], r[f"{m}_mark"]) for m in metrics]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    seeds = sorted({r["seeds"] for r in report["rows"] if r["seeds"]})
    lines += ["", "Test split, every catalog item ranked. Bold: best of a column, underlined: second."]
    if seeds and seeds != [1]:
        lines.append(f"Mean over {'/'.join(map(str, seeds))} seeds ± the half width of its 95% confidence interval (Student's t).")
    lines += ["", f"## Paired tests against {ref_label} ({test_metric} per user, two-sided)", "",
              f"| Model | {test_metric} | Δ vs {ref_label} | paired t-test p | Wilcoxon p | sign test p | units |", "|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        test = r.get("test")
        if test is None:
            lines.append(f"| {r['label']} | not run | | | | | |")
            continue
        star = "*" if test["t_p"] < SIGNIFICANCE_LEVEL and r["name"] != report["reference"] else ""
        lines.append(f"| {r['label']} | {r[test_metric]:.4f} | {test['mean_diff']:+.4f}{star} | {_p(test['t_p'])} | {_p(test['wilcoxon_p'])} | {_p(test['sign_p'])} | {test['n']} |")
    lines += ["", f"\\* paired t-test p < {SIGNIFICANCE_LEVEL}. Units are users (with seeds on the same split: each user's mean over seeds; on data that change with the seed: (seed, user) pairs).",
              "", "![NDCG@K and Recall@K over K](by_k.png)", ""]
    if report["notes"]:
        lines += [report["notes"].strip(), ""]
    by_command = not report["command"]  # several commands made the runs: each run's own
    lines += ["## Runs", "", "| run | rows | overrides (`dvc exp run -S`) | data | seconds |" + (" command |" if by_command else ""),
              "|---|---|---|---|---|" + ("---|" if by_command else "")]
    for run in runs:
        data = run.params.get("data", {})
        where = data.get("source", "?") + (f" ({data['path']})" if data.get("source") != "synthetic" else "")
        overrides = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in run.record.get("overrides", {}).items()) or "none"
        command = f" `{run.record['command']}` |" if run.record.get("command") else " |"
        lines.append(f"| [{run.name}](runs/{run.name}/params.yaml) | {', '.join(run.record.get('rows', []))} | {overrides} | {where} | {run.record.get('seconds', '')} |"
                     + (command if by_command else ""))
    notes = [(run.name, run.record["note"]) for run in runs if run.record.get("note")]  # how a run was made, when not by the set alone
    if notes:
        lines += [""] + [f"- {name}: {note}" for name, note in notes]
    return "\n".join(lines) + "\n"


def table_csv(report: dict) -> str:
    stream = io.StringIO()
    columns = ["name", "label", "model", "seeds", *(f"{m}{s}" for m in report["metrics"] for s in ("", "_ci95")),
               "mean_diff", "t_p", "wilcoxon_p", "sign_p", "units"]
    writer = csv.writer(stream, lineterminator="\n")
    writer.writerow(columns)
    for r in report["rows"]:
        test = r.get("test") or {}
        writer.writerow([r["name"], r["label"], r["model"], r["seeds"], *(r[f"{m}{s}"] for m in report["metrics"] for s in ("", "_ci95")),
                         test.get("mean_diff"), test.get("t_p"), test.get("wilcoxon_p"), test.get("sign_p"), test.get("n")])
    return stream.getvalue()


def plot_by_k(report: dict, path: Path) -> None:
    """NDCG@K and Recall@K over K, one line per row that ran (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = report["ks"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, metric in zip(axes, ("ndcg", "recall")):
        for r in report["rows"]:
            if r["seeds"]:
                means = [r[f"{metric}@{k}"] for k in ks]
                cis = [r[f"{metric}@{k}_ci95"] or 0.0 for k in ks]
                ax.errorbar(ks, means, yerr=cis if any(cis) else None, marker="o", capsize=3, label=r["label"])
        ax.set_xlabel("K")
        ax.set_ylabel(f"{metric.upper() if metric == 'ndcg' else 'Recall'}@K")
        ax.set_xticks(ks)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    fig.suptitle(report["title"], fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_report(spec: ExperimentSet, set_name: str, out: Path, command: str = "") -> dict:
    """README.md, table.csv and by_k.png of the set's collected runs in ``out``; returns the numbers."""
    collected = load_runs(out)
    report = build_report(spec, set_name, out, command, collected)
    runs = [run for run in collected if any(run.name in r["runs"] for r in report["rows"])]
    if not command:  # the command that made the runs; runs made by several (collected from other sets) list theirs
        made_by = list(dict.fromkeys(c for c in (r.record.get("command", "") for r in runs) if c))
        report["command"] = made_by[0] if len(made_by) == 1 else ""
    plot_by_k(report, out / "by_k.png")
    with atomic_path(out / "table.csv") as tmp:
        tmp.write_text(table_csv(report))
    with atomic_path(out / "README.md") as tmp:
        tmp.write_text(markdown(report, runs))
    return report
