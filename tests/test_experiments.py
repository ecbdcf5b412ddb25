"""Experiment sets (molar/experiments.py): the set files, how rows become runs, and when a run is done."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from molar.errors import MissingInputError
from molar.experiments import (
    ExperimentError,
    ExperimentSet,
    Run,
    apply_overrides,
    check_runs,
    drop_unevaluated,
    is_done,
    load_set,
    parse_set_option,
    plan_runs,
    run_record,
    workspace_key,
)

REPO = Path(__file__).resolve().parents[1]
SETS = sorted((REPO / "experiments").glob("*.yaml"))


def spec(**fields) -> ExperimentSet:
    base = {"title": "t", "reference": "a", "rows": [{"name": "a", "model": "molar"}]}
    return ExperimentSet.model_validate({**base, **fields})


# ----------------------------------------------------------------------------- the shipped sets


def test_every_paper_table_has_a_set():
    assert {p.stem for p in SETS} >= {"table2", "table3", "table4", "table5", "figure3", "appendix-a", "fusion", "seeds"}


# (set, params file) pairs that must run: every set on the embedded default but the staged
# variant of table3, which needs a backbone with a projector; on the ML-1M posters preset
# (finetune: staged) every set but table3, whose text row cannot be staged
PAIRS = [(s, "params.yaml") for s in SETS if s.stem != "table3-staged"] + [
    (s, "params-ml1m-posters.yaml") for s in SETS if s.stem != "table3"]


@pytest.mark.parametrize("set_file, params_file", PAIRS, ids=lambda v: getattr(v, "stem", v))
def test_every_run_of_every_set_has_params_the_stages_accept(set_file, params_file):
    s = load_set(set_file)
    runs = plan_runs(s, set_file.stem, base_seed=42)
    check_runs(runs, (REPO / params_file).read_text(), set_file)  # raises on a key or value the stages reject
    for run in runs:  # each row's model is evaluated in its run
        models = apply_overrides((REPO / params_file).read_text(), run.overrides)["eval"]["models"]
        assert {s.row(r).model for r in run.rows} <= set(models), run.name


def test_table2_is_one_run_of_nine_models_and_fusion_shares_the_default_run():
    table2 = plan_runs(load_set(REPO / "experiments/table2.yaml"), "table2", 42)
    assert [r.name for r in table2] == ["table2"] and len(table2[0].rows) == 9
    fusion = plan_runs(load_set(REPO / "experiments/fusion.yaml"), "fusion", 42)
    assert [r.rows for r in fusion] == [["sasrec", "post", "late"], ["no-id"], ["early"]]
    assert [r.name for r in fusion] == ["fusion-sasrec", "fusion-no-id", "fusion-early"]


def test_table2_rows_is_table2_in_five_runs_that_change_only_which_models_train():
    table2, rows = (load_set(REPO / f"experiments/{n}.yaml") for n in ("table2", "table2-rows"))
    assert [(r.name, r.label, r.model) for r in rows.rows] == [(r.name, r.label, r.model) for r in table2.rows]
    runs = plan_runs(rows, "table2-rows", 42)
    assert [r.rows for r in runs] == [["popularity", "sasrec", "molar"], ["fpmc"], ["gru4rec"], ["duorec"],
                                      ["sasrec-text", "sasrec-image", "sasrec-text-image"]]
    assert all(set(r.overrides) == {"eval.models"} for r in runs)  # every model trains as in table2's one run
    assert set().union(*(r.overrides["eval.models"] for r in runs)) == set(table2.set["eval.models"])


# ----------------------------------------------------------------------------- planning


def test_overrides_apply_set_then_row_then_command_line():
    s = spec(set={"train.epochs": 5, "align.alpha": 0.1},
             rows=[{"name": "a", "model": "molar", "set": {"align.alpha": 0.0}}, {"name": "b", "model": "molar"}])
    runs = plan_runs(s, "x", 42, extra={"train.epochs": 2})
    assert [(r.name, r.overrides) for r in runs] == [
        ("x-a", {"train.epochs": 2, "align.alpha": 0.0}),
        ("x-b", {"train.epochs": 2, "align.alpha": 0.1}),
    ]


def test_seeds_multiply_runs_counting_up_from_the_params_seed():
    s = spec(seeds=2, rows=[{"name": "a", "model": "molar"}, {"name": "b", "model": "sasrec"}])
    runs = plan_runs(s, "s", base_seed=7)
    assert [(r.name, r.seed, r.overrides, r.rows) for r in runs] == [("s-seed7", 7, {"seed": 7}, ["a", "b"]), ("s-seed8", 8, {"seed": 8}, ["a", "b"])]
    assert [r.name for r in plan_runs(s, "s", 7, seeds=1)] == ["s"]  # --seeds 1 overrides the set's 2


def test_rows_keep_the_runs_holding_them_named_as_in_the_whole_set():
    fusion = load_set(REPO / "experiments/fusion.yaml")  # runs [sasrec, post, late], [no-id], [early]
    assert [r.name for r in plan_runs(fusion, "fusion", 42, only=["early"])] == ["fusion-early"]
    # a row that shares its run brings the whole run; two rows of two runs keep the set's order
    assert [(r.name, r.rows) for r in plan_runs(fusion, "fusion", 42, only=["early", "late"])] == [
        ("fusion-sasrec", ["sasrec", "post", "late"]), ("fusion-early", ["early"])]
    s = spec(seeds=2, rows=[{"name": "a", "model": "molar"}, {"name": "b", "model": "molar", "set": {"align.alpha": 0.0}}])
    assert [r.name for r in plan_runs(s, "s", 7, only=["b"])] == ["s-b-seed7", "s-b-seed8"]
    with pytest.raises(ExperimentError, match="no row 'c'; its rows: a, b"):
        plan_runs(s, "s", 7, only=["a", "c"])


def test_set_args_read_back_by_yaml_as_the_values_given():
    run = Run(name="r", rows=["a"], overrides={"mirm.modalities": ["text", "image"], "data.on_bad_line": "no", "align.alpha": 0.0, "dueg.item_id_embedding": True})
    args = run.set_args()
    assert args[0::2] == ["-S"] * 4
    read = {a.split("=", 1)[0]: YAML(typ="safe").load(a.split("=", 1)[1]) for a in args[1::2]}
    assert read == run.overrides  # "no" stays a string: YAML 1.2, as DVC reads -S


def test_parse_set_option_reads_values_as_yaml():
    assert parse_set_option(["train.epochs=3", "mirm.modalities=[text]", "align.id_model=gru4rec"]) == {
        "train.epochs": 3, "mirm.modalities": ["text"], "align.id_model": "gru4rec"}
    with pytest.raises(ExperimentError, match="KEY=VALUE"):
        parse_set_option(["train.epochs"])


# ----------------------------------------------------------------------------- errors before any run


def test_a_typo_in_a_row_fails_before_any_run_naming_the_run_and_key(tmp_path):
    s = spec(rows=[{"name": "a", "model": "molar", "set": {"align.alpah": 0.5}}])
    with pytest.raises(ExperimentError, match=r"(?s)run x \(rows a\).*align\.alpah: unknown key"):
        check_runs(plan_runs(s, "x", 42), (REPO / "params.yaml").read_text(), tmp_path / "x.yaml")


def test_a_wrong_value_fails_naming_the_key():
    s = spec(rows=[{"name": "a", "model": "molar", "set": {"train.epochs": "many"}}])
    with pytest.raises(ExperimentError, match="train.epochs"):
        check_runs(plan_runs(s, "x", 42), (REPO / "params.yaml").read_text(), Path("x.yaml"))


@pytest.mark.parametrize("text, message", [
    ("title: t\nreference: b\nrows: [{name: a, model: molar}]\n", "reference 'b' is not a row"),
    ("title: t\nreference: a\nrows: [{name: a, model: molar}, {name: a, model: sasrec}]\n", "twice: a"),
    ("title: t\nreference: A\nrows: [{name: A, model: molar}]\n", "rows.0.name"),
    ("title: t\nreference: a\nrows: [{name: a, model: molar, sett: {}}]\n", "rows.0.sett"),
    ("title: t\nreference: a\nrows: [{name: a\n", "not valid YAML"),
])
def test_bad_set_files_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ExperimentError, match=message) as err:
        load_set(path)
    assert str(path) in str(err.value)


def test_an_unknown_set_lists_the_known_ones():
    with pytest.raises(MissingInputError, match="table3"):
        load_set(Path("experiments/no-such-set.yaml"))


# ----------------------------------------------------------------------------- done or not


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_workspace_key_follows_project_files_not_reports_metrics_or_locks(tmp_path):
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t.invalid")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    (tmp_path / "dvc.lock").write_text("a\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "x")
    key = workspace_key(tmp_path)
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.md").write_text("report")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text("{}")
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "README.md").write_text("docs")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text("def test(): pass\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "results")  # committing results, docs or tests leaves the runs valid
    assert workspace_key(tmp_path) == key
    (tmp_path / "params.yaml").write_text("seed: 2\n")  # an uncommitted change
    changed = workspace_key(tmp_path)
    assert changed != key
    (tmp_path / "new_model.py").write_text("x = 1\n")  # an untracked file: dvc exp run --temp copies it
    assert workspace_key(tmp_path) not in (key, changed)


def test_a_run_is_done_only_for_the_same_overrides_and_workspace(tmp_path):
    run = Run(name="r", rows=["a"], overrides={"align.alpha": 0.0})
    assert not is_done(tmp_path, run_record(run, "k1"))
    (tmp_path / "run.json").write_text(json.dumps({**run_record(run, "k1"), "seconds": 3.0}))
    assert is_done(tmp_path, run_record(run, "k1"))
    assert not is_done(tmp_path, run_record(run, "k2"))
    assert not is_done(tmp_path, run_record(Run(name="r", rows=["a"], overrides={"align.alpha": 0.5}), "k1"))


def test_table3_on_the_staged_preset_says_why_its_text_row_cannot_run():
    with pytest.raises(ExperimentError, match="run table3-text.*finetune: staged trains the projector"):
        check_runs(plan_runs(load_set(REPO / "experiments/table3.yaml"), "table3", 42),
                   (REPO / "params-ml1m-posters.yaml").read_text(), Path("experiments/table3.yaml"))


def test_dry_run_prints_one_temp_experiment_per_run_without_forcing_every_stage(tmp_path):
    from molar.experiments import run_set

    _git(tmp_path, "init", "-q")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    set_file = tmp_path / "demo.yaml"
    set_file.write_text("title: t\nreference: a\nrows:\n  - {name: a, model: molar}\n  - {name: b, model: molar, set: {align.alpha: 0.0}}\n")
    with pytest.raises(ExperimentError, match="not a git repository with a commit"):
        run_set(set_file, tmp_path / "out", tmp_path, dry_run=True)
    _git(tmp_path, "-c", "user.email=t@t.invalid", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x")
    lines: list[str] = []
    run_set(set_file, tmp_path / "out", tmp_path, dry_run=True, echo=lines.append)
    # -f would make `dvc exp run` rerun stages the overrides leave alone
    assert lines == ["[1/2] demo-a: dvc exp run --temp -n demo-a", "[2/2] demo-b: dvc exp run --temp -n demo-b -S align.alpha=0.0"]
    assert not (tmp_path / "out").exists()
    lines.clear()
    run_set(set_file, tmp_path / "out", tmp_path, dry_run=True, workspace=True, echo=lines.append)
    assert lines == ["[1/2] demo-a: dvc exp run -n demo-a", "[2/2] demo-b: dvc exp run -n demo-b -S align.alpha=0.0"]  # in the workspace
    lines.clear()
    run_set(set_file, tmp_path / "out", tmp_path, dry_run=True, workspace=True, only=["b"], echo=lines.append)
    assert lines == ["[1/1] demo-b: dvc exp run -n demo-b -S align.alpha=0.0"]  # --rows b: the set's name for b's run


def test_restore_interrupted_base_puts_back_the_params_a_stopped_workspace_set_started_from(tmp_path):
    from molar.experiments import WORKSPACE_BASE, restore_interrupted_base

    (tmp_path / "params.yaml").write_text("seed: 7\n")  # a run's overrides, left by kill -9
    lines: list[str] = []
    restore_interrupted_base(tmp_path, lines.append)
    assert (tmp_path / "params.yaml").read_text() == "seed: 7\n" and lines == []  # nothing to restore
    (tmp_path / WORKSPACE_BASE).parent.mkdir(parents=True)
    (tmp_path / WORKSPACE_BASE).write_text("seed: 42\n")
    restore_interrupted_base(tmp_path, lines.append)
    assert (tmp_path / "params.yaml").read_text() == "seed: 42\n"
    assert not (tmp_path / WORKSPACE_BASE).exists() and "restored" in lines[0]


def test_unstage_index_leaves_what_a_killed_dvc_exp_run_staged_unstaged_and_the_files_as_they_are(tmp_path):
    from molar.experiments import unstage_index

    _git(tmp_path, "init", "-q")
    _git(tmp_path, "config", "user.email", "t@t.invalid")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "x")
    key = workspace_key(tmp_path)
    lines: list[str] = []
    unstage_index(tmp_path, lines.append)
    assert lines == []  # nothing staged: nothing said
    (tmp_path / "params.yaml").write_text("seed: 9\n")  # a run's overrides, staged by dvc exp run, then kill -9
    _git(tmp_path, "add", "params.yaml")
    (tmp_path / "params.yaml").write_text("seed: 1\n")  # put back by restore_interrupted_base
    assert workspace_key(tmp_path) != key  # the staged copy would make every done run look stale
    unstage_index(tmp_path, lines.append)
    staged = subprocess.run(["git", "diff", "--cached", "--name-only"], cwd=tmp_path, capture_output=True, text=True).stdout
    assert staged == "" and (tmp_path / "params.yaml").read_text() == "seed: 1\n"
    assert workspace_key(tmp_path) == key and "params.yaml" in lines[0]


def test_a_collected_run_keeps_only_the_metric_files_it_made(tmp_path: Path) -> None:
    # eval.models [popularity, molar]: Molar aligned to gru4rec, so gru4rec trained; the rest is baseline carry-over
    (tmp_path / "params.yaml").write_text("eval:\n  models: [popularity, molar]\nalign:\n  id_model: gru4rec\n")
    metrics = tmp_path / "metrics"
    for model in ("popularity", "molar", "sasrec", "fpmc"):
        (metrics / "by_model" / model).mkdir(parents=True)
    for name in ("gru4rec", "sasrec", "fpmc", "sasrec-text"):
        for ext in ("csv", "json"):
            (metrics / f"{name}_train.{ext}").write_text("")
    (metrics / "molar_train").mkdir()
    for name in ("item-content.json", "eval.json", "mirm.json"):
        (metrics / name).write_text("{}")
    drop_unevaluated(tmp_path)
    assert sorted(p.name for p in (metrics / "by_model").iterdir()) == ["molar", "popularity"]
    assert sorted(p.name for p in metrics.iterdir() if p.is_file()) == ["eval.json", "gru4rec_train.csv", "gru4rec_train.json", "mirm.json"]
    assert (metrics / "molar_train").is_dir()


# ----------------------------------------------------------------------------- stopping a run
# What `molar experiment` does with a `dvc exp run`: the child (here a stand-in for dvc) starts a
# grandchild (the stage) and waits for it. A SIGTERM sent to the parent alone must stop both.
CHILD = """
import subprocess, sys, time
stage = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
open(sys.argv[1], "w").write(str(stage.pid))
stage.wait()
"""
PARENT = """
import sys
from pathlib import Path
from molar.experiments import run_in_own_group
code, stopped_by = run_in_own_group([sys.executable, "-c", sys.argv[1], sys.argv[2]], cwd=Path("."), env=None)
print(code, stopped_by.name if stopped_by else None)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (exited, not yet reaped by its parent) counts as stopped
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())


@pytest.mark.skipif(sys.platform == "win32", reason="process groups are POSIX")
def test_a_sigterm_to_the_experiment_process_alone_stops_the_run_and_its_stage(tmp_path):
    pid_file = tmp_path / "stage.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(pid_file)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    stage_pid = int(pid_file.read_text())
    assert _alive(stage_pid)

    parent.send_signal(signal.SIGTERM)  # to the parent only, as `kill PID` does
    out, _ = parent.communicate(timeout=60)

    assert parent.returncode == 0  # the parent survived the signal to report it
    assert out.split() == [str(-signal.SIGTERM), "SIGTERM"]  # the child group was stopped by SIGTERM
    deadline = time.monotonic() + 30
    while _alive(stage_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(stage_pid), "the stage (grandchild) outlived the stopped experiment"
