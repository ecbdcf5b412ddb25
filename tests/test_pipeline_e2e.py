"""End-to-end: the real `dvc repro` on the embedded default, in a copy of the repository."""

import json
import math

import pytest
from e2e_repo import DVC, git_copy, run, tool_env  # tests/e2e_repo.py

from molar.config import load_params
from molar.data.split import load_split


def uniform_random_expectation(histories, targets, n_items, k, mask_history=True):
    """Expected NDCG@k and Recall@k when the target's rank is uniform over the candidates."""
    ndcg = recall = 0.0
    for history, target in zip(histories, targets):
        masked = len(set(history) - {target}) if mask_history else 0
        n = n_items - masked  # candidates: the catalog minus masked history items
        top = min(k, n)
        recall += top / n
        ndcg += sum(1 / math.log2(r + 2) for r in range(top)) / n
    return ndcg / len(targets), recall / len(targets)


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("repo")
    env = tool_env()
    git_copy(work, env)
    out = run([*DVC, "repro"], work, env)
    shown = run([*DVC, "metrics", "show"], work, env)
    return work, out, shown


@pytest.mark.slow
def test_dvc_repro_writes_complete_metrics(pipeline_run):
    work, _, shown = pipeline_run
    params = load_params(work / "params.yaml")
    for name in ("eval.json", "valid.json"):
        metrics = json.loads((work / "metrics" / name).read_text())
        assert set(metrics) == set(params.eval.models)
        for model, values in metrics.items():
            expected = {f"{m}@{k}" for m in ("ndcg", "recall") for k in params.eval.ks}
            assert set(values) == expected, (name, model)
            assert all(0.0 <= v <= 1.0 for v in values.values()), (name, model, values)
            # merged from the model's own evaluation stage (evaluate-model@<model>)
            assert values == json.loads((work / "metrics" / "by_model" / model / name).read_text()), (name, model)
    assert "popularity" in shown and "ndcg@10" in shown


@pytest.mark.slow
def test_popularity_beats_uniform_random(pipeline_run):
    work, _, _ = pipeline_run
    params = load_params(work / "params.yaml")
    split = load_split(work / "data" / "processed")
    metrics = json.loads((work / "metrics" / "eval.json").read_text())["popularity"]
    ndcg, recall = uniform_random_expectation(split.test.histories, split.test.targets, split.n_items, 10, params.eval.mask_history)
    assert metrics["ndcg@10"] > 2 * ndcg, (metrics, ndcg)
    assert metrics["recall@10"] > 2 * recall, (metrics, recall)


@pytest.mark.slow
def test_learned_models_beat_popularity(pipeline_run):
    # the embedded default has content taste (Molar can use it through MIRM's item embeddings)
    # and ID-only successor transitions (only SASRec sees them): both must beat popularity
    work, _, _ = pipeline_run
    metrics = json.loads((work / "metrics" / "eval.json").read_text())
    popularity = metrics["popularity"]["ndcg@10"]
    assert metrics["sasrec"]["ndcg@10"] > 2 * popularity, metrics
    assert metrics["molar"]["ndcg@10"] > 1.5 * popularity, metrics


@pytest.mark.slow
def test_second_repro_is_a_no_op(pipeline_run):
    work, _, _ = pipeline_run
    # the stages of dvc.yaml and what they depend on, as `dvc repro` runs them; training stages that
    # no model of eval.models needs (train/dvc.yaml: train-id@duorec, ...) were never run, on purpose
    status = run([*DVC, "status", "--with-deps", "dvc.yaml"], work, tool_env())
    assert "up to date" in status.lower(), status


@pytest.mark.slow
def test_training_metrics_record_the_thread_count(pipeline_run):
    # results are bit-identical for one thread count only: each training stage says which it used
    work, _, _ = pipeline_run
    threads = load_params(work / "params.yaml").threads
    for name in ("mirm.json", "sasrec_train.json", "molar_train/summary.json"):
        assert json.loads((work / "metrics" / name).read_text())["threads"] == threads, name
