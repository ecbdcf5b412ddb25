import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from molar.check_metrics import (
    FAIL,
    NEW,
    PASS,
    REMOVED,
    SKIPPED,
    CheckMetricsError,
    failed,
    finite_check,
    floor_checks,
    range_checks,
    regression_checks,
    run_checks,
)
from molar.config import CiParams, load_params, parse_params
from stages import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()

# test-split ndcg@10 of three models: sasrec 2.5x and molar 1.4x popularity
EVAL = {
    "popularity": {"ndcg@10": 0.1, "recall@10": 0.2},
    "sasrec": {"ndcg@10": 0.25, "recall@10": 0.4},
    "molar": {"ndcg@10": 0.14, "recall@10": 0.3},
}


def _verdicts(rows):
    return {(r.check, r.file, r.model, r.metric): r.verdict for r in rows}


# ------------------------------------------------------------------------ pure checks
def test_ranking_values_must_be_finite_numbers_in_0_1():
    metrics = {"m": {"a": 0.0, "b": 1.0, "c": math.nan, "d": math.inf, "e": 1.5, "f": -0.1, "g": "0.3", "h": True}}
    verdicts = {r.metric: r.verdict for r in range_checks("eval.json", metrics)}
    assert verdicts == {"a": PASS, "b": PASS, "c": FAIL, "d": FAIL, "e": FAIL, "f": FAIL, "g": FAIL, "h": FAIL}


def test_other_metrics_files_only_need_finite_numbers():
    ok = finite_check("split.json", {"rows": 7549, "density": 0.07, "dropped": {"short": 0}, "source": "x", "lora": None, "resumed": True})
    assert ok.verdict == PASS and ok.metric == "all 3 numbers"  # strings, null and bools are not numbers
    bad = finite_check("mirm.json", {"resumed": False, "history": [{"loss": 2.0}, {"loss": math.nan}], "x": -math.inf})
    assert bad.verdict == FAIL and bad.metric == "history.1.loss, x"


def test_default_floors_pass_and_fail_by_factor_over_popularity():
    # every ID model > 2 x popularity, molar > 1.5 x popularity, on ndcg@10; EVAL has no fpmc/gru4rec/duorec/content rows
    rows = floor_checks(EVAL, CiParams())
    content = {name: SKIPPED for name in ("sasrec-text", "sasrec-image", "sasrec-text-image")}
    assert {r.model: r.verdict for r in rows} == {"fpmc": SKIPPED, "gru4rec": SKIPPED, "duorec": SKIPPED, "sasrec": PASS, **content, "molar": FAIL}
    molar = next(r for r in rows if r.model == "molar")
    assert molar.value == 0.14 and "0.1500" in molar.bound and "1.5 x popularity" in molar.bound


def test_a_floor_is_the_larger_of_min_and_factor_times_over():
    ci = parse_params(
        "ci:\n  metrics: [ndcg@10, recall@10]\n  floors:\n"
        "    sasrec: {min: 0.3}\n    molar: {over: popularity, factor: 1.2, min: 0.29}\n"
    ).ci
    verdicts = {(r.model, r.metric): r.verdict for r in floor_checks(EVAL, ci)}
    assert verdicts == {
        ("sasrec", "ndcg@10"): FAIL,  # 0.25 <= min 0.3
        ("sasrec", "recall@10"): PASS,  # 0.4 > 0.3
        ("molar", "ndcg@10"): FAIL,  # 0.14 <= max(0.29, 0.12)
        ("molar", "recall@10"): PASS,  # 0.3 > max(0.29, 0.24)
    }


def test_floors_of_models_or_metrics_not_in_the_file_are_skipped():
    ci = parse_params("ci:\n  metrics: [ndcg@10, ndcg@5]\n  floors:\n    sasrec: {over: popularity}\n    molar: {min: 0.01}\n").ci
    only_id_models = {"popularity": EVAL["popularity"], "sasrec": EVAL["sasrec"]}  # eval.models=[popularity,sasrec]
    rows = floor_checks(only_id_models, ci)
    assert {(r.model, r.metric): r.verdict for r in rows} == {
        ("sasrec", "ndcg@10"): PASS,
        ("sasrec", "ndcg@5"): SKIPPED,
        ("molar", "ndcg@10"): SKIPPED,
        ("molar", "ndcg@5"): SKIPPED,
    }
    no_baseline = floor_checks({"sasrec": EVAL["sasrec"]}, ci)
    assert no_baseline[0].verdict == SKIPPED and "popularity" in no_baseline[0].bound


@pytest.mark.parametrize(
    "floors, message",
    [
        ("sasrec: {}", "needs over"),
        ("sasrec: {factor: 2.0}", "factor needs over"),
        ("sasrec: {over: sasrec}", "over itself"),
        ("bert4rec: {min: 0.1}", "Input should be 'popularity'"),
        ("sasrec: {over: popularity, factor: 0}", "greater than 0"),
        ("sasrec: {min: 1.5}", "less than or equal to 1"),
    ],
)
def test_bad_floors_are_params_errors_naming_the_key(floors, message):
    with pytest.raises(ValueError, match=f"ci.floors.*{message}"):
        parse_params(f"ci:\n  floors:\n    {floors}\n")


def test_ci_metrics_must_be_ranking_metric_names():
    with pytest.raises(ValueError, match="ci.metrics: .*ndcg10: not a metric name"):
        parse_params("ci:\n  metrics: [ndcg@10, ndcg10]\n")


def test_a_drop_beyond_the_absolute_tolerance_fails_and_new_or_removed_keys_do_not():
    # the shape `dvc metrics diff --json --all` prints: {file: {"model.metric": {old, new, diff}}}
    diff = {
        "metrics/eval.json": {
            "sasrec.ndcg@10": {"old": 0.40, "new": 0.35, "diff": -0.05},
            "sasrec.recall@10": {"old": 0.50, "new": 0.495, "diff": -0.005},
            "popularity.ndcg@10": {"old": 0.10, "new": 0.20, "diff": 0.10},
            "molar.ndcg@10": {"old": None, "new": 0.3},
        },
        "metrics/valid.json": {"molar.ndcg@10": {"old": 0.3, "new": None}},
    }
    rows = regression_checks(diff, "main", tolerance=0.01)
    assert _verdicts(rows) == {
        ("regression", "eval.json", "sasrec", "ndcg@10"): FAIL,
        ("regression", "eval.json", "sasrec", "recall@10"): PASS,
        ("regression", "eval.json", "popularity", "ndcg@10"): PASS,
        ("regression", "eval.json", "molar", "ndcg@10"): NEW,
        ("regression", "valid.json", "molar", "ndcg@10"): REMOVED,
    }
    assert not failed(regression_checks(diff, "main", tolerance=0.06))


def test_the_committed_metrics_pass_the_default_floors():
    # the same factors the end-to-end test asserts on a fresh `dvc repro`
    params = load_params(REPO / "params.yaml")
    rows = run_checks(REPO / "metrics", params.ci)
    assert not failed(rows), failed(rows)
    # every evaluated model with a floor was judged, and passed
    judged = {m for m in params.eval.models if m in params.ci.floors}
    assert judged >= {"fpmc", "gru4rec", "sasrec", "molar"}
    assert {r.model for r in rows if r.check == "floor" and r.verdict == PASS} == judged


# ------------------------------------------------------------------ the CLI, exit codes
def _write_metrics(root: Path, eval_metrics: dict, valid_metrics: dict | None = None) -> None:
    (root / "metrics").mkdir(exist_ok=True)
    (root / "metrics" / "eval.json").write_text(json.dumps(eval_metrics))
    (root / "metrics" / "valid.json").write_text(json.dumps(valid_metrics if valid_metrics is not None else eval_metrics))


def _check(*args: str):
    return runner.invoke(app, ["check-metrics", "--params", "params.yaml", *args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("ci:\n  floors:\n    sasrec: {over: popularity, factor: 2.0}\n")
    return tmp_path


def test_cli_passing_floor_exits_0_and_failing_floor_exits_1_with_the_table(workdir):
    _write_metrics(workdir, EVAL)
    result = _check()
    assert result.exit_code == 0, result.output
    assert "all " in result.output and "checks passed" in result.output

    (workdir / "params.yaml").write_text("ci:\n  floors:\n    sasrec: {over: popularity, factor: 3.0}\n")
    result = _check()
    assert result.exit_code == 1, result.output
    row = next(line for line in result.output.splitlines() if line.startswith("floor"))
    assert row.split() == ["floor", "eval.json", "sasrec", "ndcg@10", "0.2500", ">", "0.3000", "(3", "x", "popularity)", FAIL]


def test_cli_fails_a_metric_out_of_range_in_valid_json(workdir):
    _write_metrics(workdir, EVAL, {"sasrec": {"ndcg@10": float("nan")}})
    result = _check()
    assert result.exit_code == 1
    assert any(line.split()[:4] == ["range", "valid.json", "sasrec", "ndcg@10"] and FAIL in line for line in result.output.splitlines())


def test_cli_user_errors_exit_2(workdir):
    result = _check()  # no metrics/ yet
    assert result.exit_code == 2 and "metrics/eval.json" in result.output and "dvc repro" in result.output

    _write_metrics(workdir, EVAL)
    (workdir / "metrics" / "valid.json").write_text("{not json")
    result = _check()
    assert result.exit_code == 2 and "valid.json:1: not valid JSON" in result.output

    (workdir / "metrics" / "valid.json").write_text(json.dumps({"sasrec": 0.3}))
    result = _check()
    assert result.exit_code == 2 and "metrics/valid.json: expected {model: {metric: value}}" in result.output

    _write_metrics(workdir, EVAL)
    result = _check("--tolerance", "0.1")
    assert result.exit_code == 2 and "--tolerance applies to --against REF only" in result.output

    (workdir / "params.yaml").write_text("ci:\n  tolerance: -1\n")
    result = _check()
    assert result.exit_code == 2 and "ci.tolerance" in result.output


# ------------------------------------------------------- regressions against a git ref
def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args], cwd=root, check=True, capture_output=True)


def test_regression_against_a_commit_names_the_key_and_respects_the_tolerance(workdir, monkeypatch):
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    _git(workdir, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=workdir, check=True, capture_output=True)
    (workdir / "dvc.yaml").write_text("metrics:\n  - metrics/eval.json\n  - metrics/valid.json\n")
    _write_metrics(workdir, EVAL)
    _git(workdir, "add", "-A")
    _git(workdir, "commit", "-q", "-m", "metrics")

    unchanged = _check("--against", "HEAD")
    assert unchanged.exit_code == 0, unchanged.output

    # sasrec ndcg@10 drops by 0.05 on the test split; a new model appears
    now = {**EVAL, "sasrec": {"ndcg@10": 0.21, "recall@10": 0.4}, "molar2": {"ndcg@10": 0.2}}
    _write_metrics(workdir, now, EVAL)
    result = _check("--against", "HEAD")
    assert result.exit_code == 1, result.output
    lines = [line.split() for line in result.output.splitlines() if line.startswith("regression")]
    assert [line[1:4] for line in lines if line[-1] == FAIL] == [["eval.json", "sasrec", "ndcg@10"]]
    assert [line[1:4] for line in lines if line[-1] == NEW] == [["eval.json", "molar2", "ndcg@10"]]

    within = _check("--against", "HEAD", "--tolerance", "0.06")
    assert within.exit_code == 0, within.output

    bad_ref = _check("--against", "no-such-branch")
    assert bad_ref.exit_code == 2 and "no-such-branch" in bad_ref.output


def test_run_checks_outside_a_git_repository_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_metrics(tmp_path, EVAL)
    with pytest.raises(CheckMetricsError, match="--against HEAD"):
        run_checks(Path("metrics"), CiParams(), against="HEAD")
