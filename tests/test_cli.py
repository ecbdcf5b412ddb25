from typer.testing import CliRunner

from stages import app

runner = CliRunner()


def test_help_lists_every_stage():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for stage in ("ingest", "split", "evaluate"):
        assert stage in result.output


def test_bad_params_exit_cleanly_with_the_key(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("data:\n  source: synthetic\n  synthetic:\n    n_users: many\n")
    result = runner.invoke(app, ["ingest", "--params", str(bad)])
    assert result.exit_code == 2
    assert "data.synthetic.n_users" in result.output and f"{bad}:4" in result.output


def test_reader_path_errors_name_the_param(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "params.yaml"
    p.write_text(f"data:\n  source: movielens\n  path: {tmp_path / 'missing'}\n")
    result = runner.invoke(app, ["ingest", "--params", str(p)])
    assert result.exit_code == 2
    assert "data.path" in result.output and "does not exist" in result.output
    assert not (tmp_path / "data" / "interim").exists()  # nothing half-written


def test_an_output_folder_that_cannot_be_made_stops_before_the_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").write_text("a file where the metrics folder should be")
    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = runner.invoke(app, ["evaluate", "--merge"])
    assert result.exit_code == 2, result.output
    # named before evaluate looks for its inputs (there is no data/processed/ here either)
    assert result.output.startswith("error: metrics/: cannot create this output folder")
    assert "Traceback" not in result.output
