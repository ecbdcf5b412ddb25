"""Atomic outputs: what a killed run leaves is swept by the next run of that stage, and only that;
an output folder that cannot be written stops the stage before any work."""

from __future__ import annotations

from pathlib import Path

import shlex

import pytest
from dvc_project import dvc_stages  # tests/dvc_project.py
from typer.testing import CliRunner

from molar.io import atomic_path, sweep_temps
from stages import app
from stages.common import prepare_outputs

runner = CliRunner()


def killed_mid_write(path: Path, monkeypatch) -> Path:
    """The temporary sibling atomic_path(path) leaves when the process dies inside the block
    (kill -9 runs no cleanup: here the cleanup is switched off)."""
    with monkeypatch.context() as m:
        m.setattr("molar.io.shutil.rmtree", lambda *a, **k: None)
        with pytest.raises(KeyboardInterrupt), atomic_path(path) as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    return tmp.parent


def test_sweep_removes_only_the_outputs_own_temporaries(tmp_path, monkeypatch):
    out = tmp_path / "eval.json"
    own = killed_mid_write(out, monkeypatch)
    assert own.parent == tmp_path and own.exists()
    old_style = tmp_path / ".eval.json.x1y2z3.tmp"  # a file, as the checkpoint writer used to leave
    old_style.write_text("partial")
    others = [
        tmp_path / "eval.json",  # the output itself
        tmp_path / ".eval.json.bak.abcd1234.tmp",  # the temporary of another output, eval.json.bak
        tmp_path / ".valid.json.abcd1234.tmp",
        tmp_path / ".eval.json.tmp",  # no random part: not made by atomic_path
        tmp_path / "notes.txt",
    ]
    for p in others:
        p.write_text("keep")
    assert set(sweep_temps(out)) == {own, old_style}
    assert not own.exists() and not old_style.exists()
    assert all(p.read_text() == "keep" for p in others)
    assert sweep_temps(out) == []
    assert sweep_temps(tmp_path / "missing" / "x.json") == []


def test_ingest_sweeps_its_own_stale_temporaries_and_nothing_else(tmp_path, monkeypatch):
    """The layout a kill -9 during ingest leaves, beside an unrelated file and another stage's temporaries."""
    monkeypatch.chdir(tmp_path)
    stale = [tmp_path / "data/.interim.k3j4h5g6.tmp/interim/images", tmp_path / "metrics/.ingest.json.a1b2c3d4.tmp"]
    for d in stale:
        d.mkdir(parents=True)
        (d / "partial").write_bytes(b"\0" * 100)
    keep = [tmp_path / "data/.processed.a1b2c3d4.tmp", tmp_path / "metrics/.split.json.a1b2c3d4.tmp", tmp_path / "metrics/notes.txt"]
    for p in keep:
        p.write_text("not ingest's")
    params = tmp_path / "params.yaml"
    params.write_text("data:\n  synthetic:\n    n_users: 30\n    n_items: 20\n")
    result = runner.invoke(app, ["ingest", "--params", str(params)])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "data/.interim.k3j4h5g6.tmp").exists() and not stale[1].exists()
    assert all(p.read_text() == "not ingest's" for p in keep)
    assert (tmp_path / "data/interim/items.parquet").exists() and (tmp_path / "metrics/ingest.json").exists()
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [".processed.a1b2c3d4.tmp", "interim"]


def test_an_output_folder_under_a_regular_file_is_a_user_error(tmp_path):
    (tmp_path / "metrics").write_text("a file where a folder should be")
    with pytest.raises(SystemExit) as stop:
        prepare_outputs(tmp_path / "metrics" / "eval.json")
    assert stop.value.code == 2


def test_an_unwritable_output_folder_is_named_before_the_stage_works(tmp_path, monkeypatch):
    # root ignores chmod, so the permission check itself is what we make fail
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    monkeypatch.setattr("stages.common.os.access", lambda path, mode: Path(path) != Path("metrics"))
    worked = []
    monkeypatch.setattr("stages.ingest.ingest", lambda *a, **k: worked.append(a))
    result = runner.invoke(app, ["ingest"])
    assert result.exit_code == 2, result.output
    assert "error: metrics/: output folder is not writable" in result.output
    assert "Traceback" not in result.output and worked == []


class _Prepared(Exception):
    pass


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


# every stage DVC runs, foreach-generated ones (evaluate-model@NAME) and train/dvc.yaml's included
CLI_STAGES = [stage for stage in dvc_stages() if stage.cmd.startswith("molar ")]


@pytest.mark.parametrize("stage", CLI_STAGES, ids=[s.addressing for s in CLI_STAGES])
def test_every_stage_prepares_exactly_its_dvc_outputs(stage, tmp_path, monkeypatch):
    """Each stage command hands prepare_outputs every output DVC declares for it (outs, metrics and
    plots; a folder output may be given by the file it writes inside, as a checkpoint in
    data/state/<stage>/)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    argv = shlex.split(stage.cmd)[1:]
    module = next(c.callback.__module__ for c in app.registered_commands if c.name == argv[0])
    seen: list[Path] = []

    def record(*paths):
        seen.extend(Path(p) for p in paths)
        raise _Prepared

    monkeypatch.setattr(f"{module}.prepare_outputs", record)
    result = runner.invoke(app, argv)
    assert isinstance(result.exception, _Prepared), (result.output, result.exception)
    declared = {Path(out.def_path) for out in stage.outs}
    assert declared, stage.addressing
    assert all(any(_within(p, d) for d in declared) for p in seen), (seen, declared)
    assert all(any(_within(p, d) for p in seen) for d in declared), (seen, declared)

