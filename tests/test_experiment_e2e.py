"""End-to-end: the smallest experiment set (appendix-a: two runs) through `molar experiment` and
`molar report`, on the embedded default with shortened schedules, the way the README runs a table."""

from __future__ import annotations

import csv
import re
import shutil
import sys

import pytest
from e2e_repo import DVC, git_copy, run, tool_env  # tests/e2e_repo.py

from molar.experiments import WORKSPACE_BASE

# fewer epochs: the runs only have to be real, not good
SHORT = ["--set", "mirm.epochs=1", "--set", "sasrec.epochs=3", "--set", "train.epochs=3"]


@pytest.mark.slow
def test_smallest_set_runs_as_dvc_experiments_and_reports_every_row(tmp_path):
    work, env = tmp_path, tool_env()
    git_copy(work, env)
    shutil.rmtree(work / "reports" / "appendix-a", ignore_errors=True)  # the committed report: this test makes its own
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "baseline"], work, env)
    molar = [sys.executable, "-m", "stages"]
    out = run([*molar, "experiment", "appendix-a", *SHORT], work, env)
    assert "[2/2] appendix-a-tiny-lora: collected" in out, out

    # DVC keeps both runs as experiments; the workspace itself is left as it was
    assert set(run([*DVC, "exp", "list", "--name-only"], work, env).split()) == {"appendix-a-tiny-full", "appendix-a-tiny-lora"}
    changed = run(["git", "status", "--porcelain", "--untracked-files=all"], work, env).splitlines()
    assert changed and all(line.startswith("?? reports/appendix-a/") for line in changed), changed

    report = (work / "reports" / "appendix-a" / "README.md").read_text()
    header = "| Model | NDCG@10 | Recall@10 | NDCG@20 | Recall@20 | NDCG@50 | Recall@50 |"  # eval.ks of params.yaml
    assert header in report
    table = report.split(header)[1].split("\n\n")[0]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.strip().split("\n")[1:]}
    assert set(rows) == {"tiny Qwen2-VL (full)", "tiny Qwen2-VL (LoRA)"}
    numbers = list(csv.DictReader((work / "reports" / "appendix-a" / "table.csv").open()))
    for column, metric in enumerate(["ndcg@10", "recall@10", "ndcg@20", "recall@20", "ndcg@50", "recall@50"]):
        values = {r["label"]: round(float(r[metric]), 4) for r in numbers}
        best = max(values.values())
        for label, value in values.items():  # bold where best, underlined where second, as the numbers say
            cell = rows[label][column].strip(" |")
            expected = f"**{value:.4f}**" if value == best else f"<u>{value:.4f}</u>"
            assert cell == expected, (label, metric, cell, values)
    # the reference row against itself: every p is 1
    assert re.search(r"\| tiny Qwen2-VL \(full\) \| [0-9.]+ \| \+0\.0000 \| 1 \| 1 \| 1 \| 400 \|", report), report
    assert (work / "reports" / "appendix-a" / "by_k.png").stat().st_size > 0
    run_dir = work / "reports" / "appendix-a" / "runs" / "appendix-a-tiny-lora"
    assert "finetune: lora" in (run_dir / "params.yaml").read_text()  # the row's override, as the run had it
    assert [p.name for p in (run_dir / "metrics" / "by_model").iterdir()] == ["molar"]  # only what the run evaluated

    again = run([*molar, "experiment", "appendix-a", *SHORT], work, env)  # done runs are skipped
    assert again.count(": done (") == 2, again


WORKSPACE_SET = """\
title: two runs, the second evaluating one more model
reference: first
set: {eval.models: [sasrec]}
rows:
  - {name: first, model: sasrec}
  - {name: second, model: sasrec, set: {eval.models: [popularity, sasrec]}}
"""


@pytest.mark.slow
def test_workspace_mode_keeps_training_between_runs_and_puts_params_back(tmp_path):
    work, env = tmp_path / "repo", tool_env()
    work.mkdir()
    git_copy(work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "baseline"], work, env)
    set_file = tmp_path / "two.yaml"
    set_file.write_text(WORKSPACE_SET)
    params = (work / "params.yaml").read_text()
    molar = [sys.executable, "-m", "stages", "experiment", str(set_file), "--workspace", "--set", "sasrec.epochs=2"]

    out = run(molar, work, env)
    assert "[2/2] two-second: collected" in out, out
    second = out.split("[2/2] two-second")[1]
    # the second run adds a model: in the workspace its SASRec is the first run's, neither retrained nor re-evaluated
    assert "Stage 'train/dvc.yaml:train-id@sasrec' didn't change, skipping" in second, second
    assert "Stage 'evaluate-model@sasrec' didn't change, skipping" in second, second
    assert "Running stage 'evaluate-model@popularity'" in second, second
    assert (work / "params.yaml").read_text() == params  # put back after the set
    assert not (work / WORKSPACE_BASE).exists()
    runs = tmp_path / "repo" / "reports" / "two" / "runs"
    assert sorted(p.name for p in (runs / "two-second" / "metrics" / "by_model").iterdir()) == ["popularity", "sasrec"]
    assert [p.name for p in (runs / "two-first" / "metrics" / "by_model").iterdir()] == ["sasrec"]

    # a set stopped mid-run (kill -9: no chance to put params.yaml back) leaves its base in
    # .dvc/tmp and the run's overrides in params.yaml; the next start restores the base first
    (work / WORKSPACE_BASE).write_text(params)
    (work / "params.yaml").write_text(params.replace("seed: 42", "seed: 7", 1))
    run(["git", "add", "params.yaml"], work, env)  # as the killed `dvc exp run` leaves it: staged
    again = run(molar, work, env)
    assert "params.yaml: restored from" in again, again
    assert "git index: unstaged params.yaml" in again, again
    assert again.count(": done (") == 2, again  # the restored params are the set's: both runs still done
    assert (work / "params.yaml").read_text() == params
