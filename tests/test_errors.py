"""Only errors about the user's inputs end as a short `error:` line and exit 2; a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from molar.errors import MissingInputError, UserError
from stages import app
from stages.common import require_input, user_errors

runner = CliRunner()


def test_user_errors_passes_other_exceptions_through():
    with pytest.raises(ValueError, match="a bug"):
        with user_errors():
            raise ValueError("a bug")
    with pytest.raises(FileNotFoundError):
        with user_errors():
            raise FileNotFoundError("a bug too")
    with pytest.raises(SystemExit) as stop:
        with user_errors():
            raise UserError("bad input")
    assert stop.value.code == 2


def _split_params(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    interim = tmp_path / "data" / "interim"
    interim.mkdir(parents=True)
    for name in ("items", "interactions"):
        (interim / f"{name}.parquet").write_bytes(b"")  # never read: build_split is replaced below
    monkeypatch.setattr("stages.split.pl.read_parquet", lambda path: None)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    return tmp_path / "params.yaml"


def test_a_value_error_from_our_code_keeps_its_traceback(tmp_path, monkeypatch):
    params = _split_params(tmp_path, monkeypatch)

    def broken(*args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr("stages.split.build_split", broken)
    result = runner.invoke(app, ["split", "--params", str(params)])
    assert result.exit_code == 1
    assert isinstance(result.exception, ValueError) and result.exc_info[2] is not None
    assert "error:" not in result.output


def test_a_user_error_exits_2_with_a_clean_message(tmp_path, monkeypatch):
    params = _split_params(tmp_path, monkeypatch)

    def refuse(*args):
        raise UserError("split: no user has enough interactions; lower split.min_user_length")

    monkeypatch.setattr("stages.split.build_split", refuse)
    result = runner.invoke(app, ["split", "--params", str(params)])
    assert result.exit_code == 2
    assert result.output.startswith("error: split: no user has enough interactions")
    assert "Traceback" not in result.output


def test_a_stage_run_before_its_inputs_exist_names_the_stage_to_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = runner.invoke(app, ["split"])
    assert result.exit_code == 2
    assert "data/interim/items.parquet: missing; run `molar ingest` first" in result.output
    with pytest.raises(MissingInputError):
        require_input(tmp_path / "nothing", "ingest")
    assert isinstance(MissingInputError("x"), FileNotFoundError)  # callers that catch FileNotFoundError still do


def test_training_outcomes_and_model_bugs_are_told_apart():
    from molar.evaluate import NonFiniteScoreError
    from molar.models.molar import CollapseError

    assert issubclass(CollapseError, UserError)  # these params collapsed the embeddings: advice, no traceback
    assert not issubclass(NonFiniteScoreError, UserError)  # NaN scores are a model bug: traceback
