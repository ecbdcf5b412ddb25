"""Per-user metrics (written by `molar evaluate --model NAME`) and the paired significance tests on them."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from molar.errors import MissingInputError
from molar.evaluate import evaluate_scorer, metrics_from_ranks, per_user_metrics, scorer_ranks
from molar.model_metrics import user_metrics_frame
from molar.significance import SignificanceError, compare, load_user_metrics, paired_metric, paired_tests
from stages import app

LOG2_3 = math.log2(3)

# ------------------------------------------------------------------------------ paired tests


def test_sign_test_on_five_users_all_better():
    r = paired_tests([0.5, 0.4, 0.3, 0.2, 0.1], [0.0] * 5)
    assert r["sign_p"] == pytest.approx(2 * 0.5**5)  # 0.0625: P(5 of 5 or 0 of 5 heads)
    assert r["n"] == 5 and r["mean_diff"] == pytest.approx(0.3)


def test_sign_test_with_one_user_worse():
    r = paired_tests([1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0])
    assert r["sign_p"] == pytest.approx(2 * (1 + 5) / 32)  # P(<= 1 or >= 4 of 5) = 0.375


def test_t_test_and_wilcoxon_on_differences_one_two_three():
    r = paired_tests([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    # mean 2, sd 1, se 1 / sqrt(3): t = 2 sqrt(3)
    assert r["t_stat"] == pytest.approx(2 * math.sqrt(3))  # 3.4641
    # Student's t with 2 df has CDF 1/2 + t / (2 sqrt(2 + t^2)): two-sided p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(12/14)
    assert r["t_p"] == pytest.approx(1 - math.sqrt(6 / 7))  # 0.0742
    # exact Wilcoxon: W+ = 6 is the largest of the 2^3 equally likely sign patterns; two-sided 2/8
    assert r["wilcoxon_p"] == pytest.approx(0.25)
    assert r["sign_p"] == pytest.approx(0.25)
    assert list(r) == ["mean_diff", "t_stat", "t_p", "wilcoxon_p", "sign_p", "n"]


def test_zero_differences_are_dropped_by_the_rank_tests_not_the_t_test():
    r = paired_tests([0.0, 0.0, 1.0, 2.0, 3.0], [0.0] * 5)
    assert r["wilcoxon_p"] == pytest.approx(0.25) and r["sign_p"] == pytest.approx(0.25)  # as for [1, 2, 3]
    # t over all 5: mean 1.2, sd sqrt(1.7); t = 1.2 / sqrt(1.7 / 5)
    assert r["t_stat"] == pytest.approx(1.2 / math.sqrt(1.7 / 5)) and r["n"] == 5


def test_the_direction_changes_the_sign_not_the_p_values():
    a, b = [0.3, 0.1, 0.7, 0.2], [0.1, 0.4, 0.0, 0.0]
    ab, ba = paired_tests(a, b), paired_tests(b, a)
    assert ab["t_stat"] == pytest.approx(-ba["t_stat"]) and ab["mean_diff"] == pytest.approx(-ba["mean_diff"])
    assert [ab[k] for k in ("t_p", "wilcoxon_p", "sign_p")] == pytest.approx([ba[k] for k in ("t_p", "wilcoxon_p", "sign_p")])


def test_a_model_against_itself_has_p_one():
    a = [0.0, 1.0, 1 / LOG2_3, 0.5]
    assert paired_tests(a, a) == {"mean_diff": 0.0, "t_stat": 0.0, "t_p": 1.0, "wilcoxon_p": 1.0, "sign_p": 1.0, "n": 4}


def test_equal_nonzero_differences_give_an_infinite_t():
    r = paired_tests([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    assert r["t_stat"] == math.inf and r["t_p"] == 0.0 and r["sign_p"] == pytest.approx(0.25)


@pytest.mark.parametrize("a,b,message", [([1.0, 2.0], [1.0], "same users"), ([1.0], [0.0], "at least 2 users"), ([1.0, math.nan], [0.0, 0.0], "NaN")])
def test_bad_vectors_are_errors(a, b, message):
    with pytest.raises(SignificanceError, match=message):
        paired_tests(a, b)


def _users(user_idx, values, metric="ndcg@10"):
    return pl.DataFrame({"user_idx": user_idx, "target": [1] * len(user_idx), "rank": [0] * len(user_idx), metric: values})


def test_paired_metric_aligns_by_user():
    a = _users([2, 0, 1], [0.2, 0.0, 0.1])
    b = _users([0, 1, 2], [1.0, 1.1, 1.2])
    x, y = paired_metric(a, b, "ndcg@10")
    assert x.tolist() == [0.0, 0.1, 0.2] and y.tolist() == [1.0, 1.1, 1.2]


def test_models_evaluated_on_other_users_are_an_error():
    a, b = _users([0, 1, 2], [0.1, 0.2, 0.3]), _users([0, 1, 3], [0.1, 0.2, 0.3])
    with pytest.raises(SignificanceError, match=r"'sasrec' and 'gru4rec' were evaluated on different users \(1 only in 'sasrec', 1 only in 'gru4rec'\)"):
        paired_metric(a, b, "ndcg@10", ("sasrec", "gru4rec"))
    with pytest.raises(SignificanceError, match="different users"):
        paired_metric(a, _users([0, 1], [0.1, 0.2]), "ndcg@10")
    with pytest.raises(SignificanceError, match="no per-user metric 'recall@5'; it has ndcg@10"):
        paired_metric(a, a, "recall@5")


# --------------------------------------------------------------- per-user metrics of the evaluator

# 3 users, 4 items; column j scores item j (column 0 padding, never read)
SCORES = torch.tensor([[9.0, 1.0, 2.0, 3.0, 0.0], [9.0, 1.0, 2.0, 2.0, 0.0], [9.0, 1.0, 2.0, 3.0, 0.0]])
HISTORIES = [[1, 2], [2, 3], [3]]
TARGETS = [3, 4, 4]
# user 0: 1 and 2 masked, target 3 is the best of {3, 4}: rank 0
# user 1: 2 and 3 masked, target 4 (0.0) below item 1: rank 1
# user 2: 3 masked, target 4 below items 1 and 2: rank 2


def test_per_user_metrics_by_hand_and_their_means_are_the_aggregate():
    ranks = scorer_ranks(lambda h: SCORES, HISTORIES, TARGETS, 4, progress=False)
    assert ranks.tolist() == [0, 1, 2]
    per_user = per_user_metrics(ranks, ks=[2, 1])
    assert list(per_user) == ["ndcg@1", "recall@1", "ndcg@2", "recall@2"]
    assert per_user["ndcg@1"].tolist() == [1.0, 0.0, 0.0] and per_user["recall@1"].tolist() == [1.0, 0.0, 0.0]
    assert per_user["ndcg@2"].tolist() == pytest.approx([1.0, 1 / LOG2_3, 0.0]) and per_user["recall@2"].tolist() == [1.0, 1.0, 0.0]
    aggregate = evaluate_scorer(lambda h: SCORES, HISTORIES, TARGETS, 4, ks=[1, 2], progress=False)
    assert aggregate == metrics_from_ranks(ranks, [1, 2])
    for key, value in aggregate.items():
        assert abs(per_user[key].mean() - value) < 1e-9, key
    assert per_user_metrics(ranks, [10])["ndcg@10"].tolist() == pytest.approx([1.0, 1 / LOG2_3, 0.5])


def test_ranks_do_not_depend_on_the_chunk_size():
    def score_fn(histories):  # rows of SCORES for users in order: chunks of 2, then 1
        score_fn.start += len(histories)
        return SCORES[score_fn.start - len(histories) : score_fn.start]

    score_fn.start = 0
    assert scorer_ranks(score_fn, HISTORIES, TARGETS, 4, chunk_size=2, progress=False).tolist() == [0, 1, 2]


def test_user_metrics_frame_columns():
    ranks = torch.tensor([0, 1, 2])
    frame = user_metrics_frame([5, 6, 7], TARGETS, ranks, per_user_metrics(ranks, [1]))
    assert frame.columns == ["user_idx", "target", "rank", "ndcg@1", "recall@1"]
    assert frame.rows() == [(5, 3, 0, 1.0, 1.0), (6, 4, 1, 0.0, 0.0), (7, 4, 2, 0.0, 0.0)]
    with pytest.raises(ValueError, match="different lengths"):
        user_metrics_frame([5, 6], TARGETS, ranks, {})


# ------------------------------------------------------------------- the stage and the command


def _tiny_pipeline(root):
    """data/processed and data/models/popularity for 3 users and 4 items, by hand."""
    from molar.models.popularity import save_popularity

    processed = root / "data" / "processed"
    processed.mkdir(parents=True)
    pl.DataFrame({"item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"]}).write_parquet(processed / "items.parquet")
    pl.DataFrame({"user_idx": [0, 1, 2], "user_id": ["u", "v", "w"], "items": [[1], [2], [3]]}).write_parquet(processed / "train.parquet")
    valid = {"user_idx": [0, 1, 2], "history": [[1], [2], [3]], "target": [2, 3, 3]}
    test = {"user_idx": [0, 1, 2], "history": [[1, 2], [2, 3], [3, 3]], "target": [3, 4, 4]}
    pl.DataFrame(valid).write_parquet(processed / "valid.parquet")
    pl.DataFrame(test).write_parquet(processed / "test.parquet")
    save_popularity(root / "data" / "models" / "popularity", {"valid": valid["history"], "test": test["history"]}, n_items=4)
    (root / "params.yaml").write_text("seed: 1\nthreads: 1\neval:\n  ks: [1, 2]\n")


def test_evaluate_writes_per_user_metrics_whose_means_are_the_json(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tiny_pipeline(tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--model", "popularity"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "metrics" / "by_model" / "popularity"
    # test popularity counts (over the test histories): item 1: 1, 2: 2, 3: 3, 4: 0
    # user 0: 1, 2 masked, target 3 tops {3, 4}: rank 0; user 1: 2, 3 masked, target 4 below 1: rank 1;
    # user 2: 3 masked, target 4 below 1 and 2: rank 2
    test = pl.read_parquet(out / "test_users.parquet")
    assert test.columns == ["user_idx", "target", "rank", "ndcg@1", "recall@1", "ndcg@2", "recall@2"]
    assert test["rank"].to_list() == [0, 1, 2] and test["user_idx"].to_list() == [0, 1, 2]
    # valid counts: items 1, 2, 3 once each, 4 never; ties count against the target (user 2's target 3
    # is in its history and stays a candidate)
    valid = pl.read_parquet(out / "valid_users.parquet")
    assert valid["rank"].to_list() == [1, 1, 2]
    for frame, name in ((test, "eval.json"), (valid, "valid.json")):
        aggregate = json.loads((out / name).read_text())
        for key, value in aggregate.items():
            assert abs(frame[key].mean() - value) < 1e-9, (name, key)
    assert load_user_metrics(tmp_path / "metrics" / "by_model", "popularity", "valid").equals(valid)


def test_significance_command_prints_each_model_against_the_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_model = tmp_path / "metrics" / "by_model"
    for model, values in (("sasrec", [0.0, 0.0, 0.0, 0.0, 0.0]), ("better", [0.5, 0.4, 0.3, 0.2, 0.1])):
        (by_model / model).mkdir(parents=True)
        _users([0, 1, 2, 3, 4], values).write_parquet(by_model / model / "test_users.parquet")
    rows = compare(["sasrec", "better"], "sasrec", "ndcg@10", by_model)
    assert [r["model"] for r in rows] == ["sasrec", "better"] and rows[0]["t_p"] == 1.0
    assert rows[1]["sign_p"] == pytest.approx(0.0625) and rows[1]["mean"] == pytest.approx(0.3) and rows[1]["reference_mean"] == 0.0
    result = CliRunner().invoke(app, ["significance", "--models", "sasrec,better", "--against", "sasrec"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["model", "ndcg@10", "diff", "vs"]
    assert lines[1].split() == ["sasrec", "0.0000", "+0.0000", "0.000", "1", "1", "1", "5"]
    assert lines[2].split()[:3] == ["better", "0.3000", "+0.3000"] and lines[2].split()[-2:] == ["0.0625", "5"]
    missing = CliRunner().invoke(app, ["significance", "--models", "nope", "--against", "sasrec"])
    assert missing.exit_code == 2 and "nope/test_users.parquet" in missing.output and "molar evaluate --model nope" in missing.output


def test_missing_per_user_file_is_a_missing_input(tmp_path):
    with pytest.raises(MissingInputError, match="run `molar evaluate --model sasrec`"):
        load_user_metrics(tmp_path, "sasrec")
    with pytest.raises(SignificanceError, match="part 'train'"):
        load_user_metrics(tmp_path, "sasrec", "train")
