"""Evaluation as DVC stages: one per model of eval.models, merged into metrics/eval.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import networkx as nx
import pytest
from ruamel.yaml import YAML

from molar.errors import UserError
from molar.model_metrics import by_k_csv, merge_model_metrics

REPO = Path(__file__).resolve().parents[1]
LLM_STAGES = {"sft-data", "train-mirm", "train-molar"}
DVC_FILES = ("dvc.yaml", "train/dvc.yaml")


def _pipeline(work: Path, models: list[str], monkeypatch) -> tuple[dict[str, set[str]], list[str]]:
    """In a copy of the pipeline files whose params.yaml lists ``models`` in eval.models, resolved by
    DVC itself: stage name -> the stages it (transitively) depends on, and the stages a plain
    `dvc repro` plans to run there (in order; on a fresh copy it runs every one it plans)."""
    from dvc.dvcfile import PROJECT_FILE
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    for name in DVC_FILES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, work / name)
    yaml = YAML()
    params = yaml.load(REPO / "params.yaml")
    params["eval"]["models"] = models
    yaml.dump(params, work / "params.yaml")
    Repo.init(str(work), no_scm=True).close()
    with Repo(str(work)) as repo:
        graph = repo.index.graph  # edges point from a stage to the stages it depends on
        upstream = {s.name: {d.name for d in nx.descendants(graph, s)} for s in graph.nodes}
        monkeypatch.chdir(work)  # a plain `dvc repro` plans ./dvc.yaml and what it depends on
        ran = [s.name for s in plan_repro(get_active_graph(graph), collect_stages(repo, [PROJECT_FILE]))]
    return upstream, ran


def test_id_models_only_need_no_llm_stage(tmp_path, monkeypatch):
    upstream, ran = _pipeline(tmp_path, ["popularity", "sasrec"], monkeypatch)
    assert "evaluate-model@molar" not in upstream
    assert {"evaluate-model@popularity", "evaluate-model@sasrec", "train-popularity", "train-id@sasrec"} <= upstream["evaluate"]
    assert not upstream["evaluate"] & LLM_STAGES, upstream["evaluate"]
    assert set(ran) == {"ingest", "split", "train-popularity", "train-id@sasrec", "evaluate-model@popularity", "evaluate-model@sasrec", "evaluate"}
    assert ran[-1] == "evaluate"


def test_listing_molar_pulls_in_the_llm_stages(tmp_path, monkeypatch):
    upstream, ran = _pipeline(tmp_path, ["popularity", "sasrec", "molar"], monkeypatch)
    assert LLM_STAGES <= upstream["evaluate"] and LLM_STAGES <= set(ran)
    assert not upstream["evaluate-model@sasrec"] & LLM_STAGES  # each model's evaluation needs only its own


def test_listing_the_late_fusion_ensemble_fits_it_from_its_two_components(tmp_path, monkeypatch):
    upstream, ran = _pipeline(tmp_path, ["sasrec", "molar+sasrec"], monkeypatch)
    assert {"train-late-fusion", "train-molar", "train-id@sasrec"} <= upstream["evaluate-model@molar+sasrec"]
    assert ran.index("train-molar") < ran.index("train-late-fusion") < ran.index("evaluate-model@molar+sasrec")
    assert "evaluate-model@molar" not in ran  # the ensemble needs Molar's checkpoint, not its metrics


# ----------------------------------------------------------------------------------- merge


def _write_model(by_model: Path, model: str, valid: dict, test: dict) -> None:
    (by_model / model).mkdir(parents=True)
    (by_model / model / "valid.json").write_text(json.dumps(valid))
    (by_model / model / "eval.json").write_text(json.dumps(test))


def _metrics(ndcg10: float, recall10: float, ndcg20: float = 0.5, recall20: float = 0.75) -> dict:
    return {"ndcg@10": ndcg10, "recall@10": recall10, "ndcg@20": ndcg20, "recall@20": recall20}


def test_merge_follows_eval_models_and_ignores_other_files(tmp_path):
    _write_model(tmp_path, "sasrec", _metrics(0.25, 0.5), _metrics(0.125, 0.25))
    _write_model(tmp_path, "popularity", _metrics(0.0625, 0.125), _metrics(0.03125, 0.0625))
    _write_model(tmp_path, "molar", _metrics(0.9, 0.9), _metrics(0.9, 0.9))  # stale: not listed
    merged = merge_model_metrics(tmp_path, ["sasrec", "popularity"], ks=[10])
    assert merged == {
        "valid": {"sasrec": {"ndcg@10": 0.25, "recall@10": 0.5}, "popularity": {"ndcg@10": 0.0625, "recall@10": 0.125}},
        "test": {"sasrec": {"ndcg@10": 0.125, "recall@10": 0.25}, "popularity": {"ndcg@10": 0.03125, "recall@10": 0.0625}},
    }
    assert list(merged["test"]) == ["sasrec", "popularity"]  # eval.models order
    assert by_k_csv(merged["test"], [10]) == "model,k,ndcg,recall\nsasrec,10,0.125000,0.250000\npopularity,10,0.031250,0.062500\n"


def test_merge_keeps_the_evaluators_key_order(tmp_path):
    _write_model(tmp_path, "sasrec", _metrics(0.25, 0.5), _metrics(0.125, 0.25))
    merged = merge_model_metrics(tmp_path, ["sasrec"], ks=[10, 20])
    assert list(merged["test"]["sasrec"]) == ["ndcg@10", "recall@10", "ndcg@20", "recall@20"]


def test_merge_names_a_missing_model_file(tmp_path):
    _write_model(tmp_path, "sasrec", _metrics(0.25, 0.5), _metrics(0.125, 0.25))
    with pytest.raises(UserError, match=r"popularity/valid\.json.*molar evaluate --model popularity"):
        merge_model_metrics(tmp_path, ["sasrec", "popularity"], ks=[10])


def test_merge_refuses_a_file_written_for_other_ks(tmp_path):
    _write_model(tmp_path, "sasrec", _metrics(0.25, 0.5), _metrics(0.125, 0.25))
    with pytest.raises(UserError, match=r"sasrec/valid\.json: no ndcg@50, recall@50"):
        merge_model_metrics(tmp_path, ["sasrec"], ks=[10, 50])


# ------------------------------------------------------------------------- popularity model


def test_saved_popularity_scores_like_the_fitted_model(tmp_path):
    from molar.models.popularity import Popularity, load_popularity, save_popularity

    histories = {"valid": [[1, 2, 2], [3]], "test": [[1, 2, 2, 4], [3, 3]]}
    save_popularity(tmp_path / "popularity", histories, n_items=4)
    for part, h in histories.items():
        loaded = load_popularity(tmp_path / "popularity", part).score([[1], [2]])
        assert loaded.tolist() == Popularity.fit(h, 4).score([[1], [2]]).tolist()
    assert load_popularity(tmp_path / "popularity", "test").item_scores.tolist()[1:] == [1.0, 2.0, 2.0, 1.0]
    with pytest.raises(UserError, match="run `molar train-popularity` first"):
        load_popularity(tmp_path / "nothing", "test")


@pytest.mark.parametrize(
    "args,message",
    [([], "give one of --model NAME"), (["--model", "sasrec", "--merge"], "give one of --model NAME"), (["--model", "nope"], "--model nope: no scorer")],
)
def test_evaluate_needs_one_model_or_the_merge(tmp_path, args, message):
    from typer.testing import CliRunner

    from stages import app

    (tmp_path / "params.yaml").write_text("seed: 1\n")
    result = CliRunner().invoke(app, ["evaluate", "--params", str(tmp_path / "params.yaml"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
