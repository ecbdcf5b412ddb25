"""`molar report SET` (molar/report.py) on collected runs made by hand: numbers you can check by eye."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from molar.experiments import ExperimentError, ExperimentSet
from molar.report import build_report, marks, mean_ci, write_report
from stages import app

T_975_1DF = 12.706204736174698  # Student's t, 97.5% quantile, 1 degree of freedom


def write_run(out: Path, name: str, rows: list[str], per_user: dict[str, list[float]], *, seed: int | None = None,
              ks: tuple[int, ...] = (1, 2), targets: list[int] | None = None) -> None:
    """A collected run as `molar experiment` leaves it: per model, per-user ndcg@K (recall = ndcg here)
    and eval.json holding their means."""
    run_dir = out / "runs" / name
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "params.yaml").write_text(f"seed: {seed or 42}\ndata: {{source: synthetic}}\neval: {{ks: [{', '.join(map(str, ks))}]}}\n")
    overrides = {"seed": seed} if seed is not None else {}
    (run_dir / "run.json").write_text(json.dumps({"run": name, "rows": rows, "overrides": overrides, "workspace_key": "k",
                                                  "seconds": 1.5, "command": "molar experiment demo"}))
    eval_json = {}
    for model, values in per_user.items():
        n = len(values)
        frame = {"user_idx": list(range(1, n + 1)), "target": targets or list(range(10, 10 + n)), "rank": [0] * n}
        for k in ks:
            frame[f"ndcg@{k}"] = values
            frame[f"recall@{k}"] = values
        user_dir = run_dir / "metrics" / "by_model" / model
        user_dir.mkdir(parents=True)
        pl.DataFrame(frame, schema_overrides={"user_idx": pl.Int64, "target": pl.Int64, "rank": pl.Int64}).write_parquet(user_dir / "test_users.parquet")
        eval_json[model] = {f"{m}@{k}": sum(values) / n for k in ks for m in ("ndcg", "recall")}
    (run_dir / "metrics" / "eval.json").write_text(json.dumps(eval_json))


def demo_set(reference: str = "molar", **fields) -> ExperimentSet:
    rows = [{"name": "pop", "label": "Pop", "model": "popularity"}, {"name": "sasrec", "label": "SASRec", "model": "sasrec"},
            {"name": "molar", "label": "Molar", "model": "molar", "set": {"align.alpha": 0.1}}]
    return ExperimentSet.model_validate({"title": "Demo", "reference": reference, "rows": rows, **fields})


def test_marks_bold_every_best_and_underline_the_next_value():
    assert marks([0.5, 0.3, 0.5, 0.1]) == ["best", "second", "best", ""]
    assert marks([0.30001, 0.3, None]) == ["best", "best", ""]  # equal as shown (4 decimals)
    assert marks([0.2]) == ["best"]


def test_mean_ci_is_students_t_interval_of_the_mean():
    assert mean_ci([0.3]) == (0.3, None)
    mean, half = mean_ci([0.2, 0.4])
    # sd = 0.1414, se = sd / sqrt(2) = 0.1, half width = t(0.975, 1) x 0.1
    assert mean == pytest.approx(0.3) and half == pytest.approx(T_975_1DF * 0.1)


def test_report_table_marks_and_tests_against_the_reference(tmp_path):
    write_run(tmp_path, "demo-pop", ["pop", "sasrec"], {"popularity": [0.0, 0.0, 0.0], "sasrec": [0.1, 0.2, 0.3]})
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.0, 0.0, 0.0]})
    report = write_report(demo_set(), "demo", tmp_path)
    rows = {r["name"]: r for r in report["rows"]}
    assert report["metrics"] == ["ndcg@1", "recall@1", "ndcg@2", "recall@2"]  # K columns from eval.ks
    assert rows["sasrec"]["ndcg@1"] == pytest.approx(0.2) and rows["sasrec"]["ndcg@1_mark"] == "best"
    assert rows["pop"]["ndcg@1_mark"] == rows["molar"]["ndcg@1_mark"] == "second"  # 0.0 twice: both second
    # the reference against itself: no difference, every p is 1
    assert rows["molar"]["test"] == {"mean_diff": 0.0, "t_stat": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0, "sign_p": 1.0, "n": 3}
    # SASRec - Molar per user = 0.1, 0.2, 0.3: t = 2 sqrt(3), two-sided p = 1 - sqrt(6/7), exact Wilcoxon 2/8
    assert rows["sasrec"]["test"]["t_p"] == pytest.approx(1 - math.sqrt(6 / 7))
    assert rows["sasrec"]["test"]["wilcoxon_p"] == pytest.approx(0.25)

    text = (tmp_path / "README.md").read_text()
    assert "| Model | NDCG@1 | Recall@1 | NDCG@2 | Recall@2 |" in text
    assert "| SASRec | **0.2000** | **0.2000** | **0.2000** | **0.2000** |" in text
    assert "| Pop | <u>0.0000</u> | <u>0.0000</u> |" in text and "| Molar | <u>0.0000</u> |" in text
    assert "| SASRec | 0.2000 | +0.2000 | 0.0742 | 0.25 | 0.25 | 3 |" in text  # p 0.074 > 0.05: no star
    assert "| Molar | 0.0000 | +0.0000 | 1 | 1 | 1 | 3 |" in text
    assert "Made by `molar experiment demo`" in text and "![NDCG@K and Recall@K over K](by_k.png)" in text
    assert (tmp_path / "by_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = list(csv.DictReader((tmp_path / "table.csv").open()))
    assert [r["name"] for r in table] == ["pop", "sasrec", "molar"] and float(table[1]["ndcg@1"]) == pytest.approx(0.2)


def test_bold_best_and_underlined_second_follow_the_numbers(tmp_path):
    write_run(tmp_path, "demo-pop", ["pop", "sasrec"], {"popularity": [0.1, 0.1], "sasrec": [0.5, 0.7]})
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.2, 0.4]})
    write_report(demo_set(), "demo", tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| Pop | 0.1000 | 0.1000 | 0.1000 | 0.1000 |" in text
    assert "| SASRec | **0.6000** | **0.6000** | **0.6000** | **0.6000** |" in text
    assert "| Molar | <u>0.3000</u> | <u>0.3000</u> | <u>0.3000</u> | <u>0.3000</u> |" in text


def test_a_row_not_run_yet_is_shown_not_dropped(tmp_path):
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.2, 0.4]})
    report = write_report(demo_set(), "demo", tmp_path)
    assert [r["seeds"] for r in report["rows"]] == [0, 0, 1]
    text = (tmp_path / "README.md").read_text()
    assert "| Pop | not run | not run | not run | not run |" in text and "| SASRec | not run |" in text


def test_a_runs_note_says_how_it_was_made(tmp_path):
    """A run collected by another set (run.json "note") says so under the runs table; runs without one add nothing."""
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.2, 0.4]})
    write_run(tmp_path, "demo-pop", ["pop"], {"popularity": [0.1, 0.1]})
    record = json.loads((tmp_path / "runs/demo-molar/run.json").read_text())
    (tmp_path / "runs/demo-molar/run.json").write_text(json.dumps({**record, "note": "collected by set X, rows renamed"}))
    write_report(demo_set(), "demo", tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert text.count("collected by set X") == 1 and "- demo-molar: collected by set X, rows renamed" in text
    assert "- demo-pop:" not in text


def test_runs_made_by_several_commands_each_show_theirs(tmp_path):
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.2, 0.4]})
    write_run(tmp_path, "demo-pop", ["pop"], {"popularity": [0.1, 0.1]})
    write_report(demo_set(), "demo", tmp_path)
    assert "Made by `molar experiment demo`" in (tmp_path / "README.md").read_text()  # one command: the header says it
    record = json.loads((tmp_path / "runs/demo-pop/run.json").read_text())
    (tmp_path / "runs/demo-pop/run.json").write_text(json.dumps({**record, "command": "molar experiment other"}))
    write_report(demo_set(), "demo", tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "Made by `" not in text and "Made by the commands of the runs below" in text
    assert "| 1.5 | `molar experiment demo` |" in text and "| 1.5 | `molar experiment other` |" in text


def test_seeds_on_one_split_average_each_user_then_pair(tmp_path):
    for seed, (sasrec, molar) in {42: ([0.2, 0.4, 0.6], [0.0, 0.0, 0.0]), 43: ([0.4, 0.6, 0.8], [0.2, 0.2, 0.2])}.items():
        write_run(tmp_path, f"demo-seed{seed}", ["pop", "sasrec", "molar"],
                  {"popularity": [0.0] * 3, "sasrec": sasrec, "molar": molar}, seed=seed, targets=[5, 6, 7])
    rows = {r["name"]: r for r in build_report(demo_set(), "demo", tmp_path)["rows"]}
    # SASRec per seed: 0.4, 0.6 -> mean 0.5, half width t(0.975, 1) x sd / sqrt(2) = 12.706 x 0.1
    assert rows["sasrec"]["seeds"] == 2 and rows["sasrec"]["ndcg@1"] == pytest.approx(0.5)
    assert rows["sasrec"]["ndcg@1_ci95"] == pytest.approx(T_975_1DF * 0.1)
    # same users and targets in both seeds: units = 3 users, each averaged over the seeds
    # (differences 0.2, 0.4, 0.6: mean 0.4)
    assert rows["sasrec"]["test"]["n"] == 3 and rows["sasrec"]["test"]["mean_diff"] == pytest.approx(0.4)


def test_seeds_whose_data_differ_pair_seed_and_user(tmp_path):
    for seed, targets in ((42, [5, 6, 7]), (43, [8, 9, 10])):  # the synthetic default regenerates its data per seed
        write_run(tmp_path, f"demo-seed{seed}", ["pop", "sasrec", "molar"],
                  {"popularity": [0.0] * 3, "sasrec": [0.5] * 3, "molar": [0.1, 0.2, 0.3]}, seed=seed, targets=targets)
    rows = {r["name"]: r for r in write_report(demo_set(), "demo", tmp_path)["rows"]}
    assert rows["sasrec"]["test"]["n"] == 6
    assert "| Molar | <u>0.2000 ± 0.0000</u> |" in (tmp_path / "README.md").read_text()  # 0.2 in both seeds


def test_runs_at_different_ks_are_an_error(tmp_path):
    write_run(tmp_path, "demo-pop", ["pop", "sasrec"], {"popularity": [0.1], "sasrec": [0.5]}, ks=(1, 2))
    write_run(tmp_path, "demo-molar", ["molar"], {"molar": [0.2]}, ks=(1, 5))
    with pytest.raises(ExperimentError, match="different eval.ks"):
        build_report(demo_set(), "demo", tmp_path)


def test_report_command_reads_a_set_file_and_its_runs(tmp_path):
    set_file = tmp_path / "demo.yaml"
    set_file.write_text("title: Demo\nreference: molar\nrows:\n  - {name: molar, model: molar}\n  - {name: sasrec, model: sasrec}\n")
    write_run(tmp_path / "out", "demo", ["molar", "sasrec"], {"molar": [0.2, 0.4], "sasrec": [0.3, 0.3]})
    result = CliRunner().invoke(app, ["report", str(set_file), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| molar | **0.3000** |" in (tmp_path / "out" / "README.md").read_text()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope.yaml"), "--out", str(tmp_path / "out")])
    assert missing.exit_code == 2 and "no such experiment set" in missing.output


def test_a_significant_difference_gets_a_star(tmp_path):
    write_run(tmp_path, "demo", ["pop", "sasrec", "molar"], {"popularity": [0.0] * 8, "sasrec": [0.5, 0.6, 0.5, 0.6, 0.5, 0.6, 0.5, 0.6], "molar": [0.0] * 8})
    write_report(demo_set(), "demo", tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "| SASRec | 0.5500 | +0.5500* |" in text and "| Pop | 0.0000 | +0.0000 |" in text
