"""End-to-end: `dvc exp run -S` on the embedded default, the way the README drives experiments.

DVC rewrites params.yaml in its own YAML style on every -S (block lists, "no" unquoted); every
stage must still read it. Relies only on the metrics/eval.json contract {model: {"ndcg@K": ...}}.
"""

import json

import pytest
from e2e_repo import DVC, git_copy, run, tool_env  # tests/e2e_repo.py

from molar.config import load_params


@pytest.mark.slow
def test_exp_run_set_param_reruns_and_changes_metrics(tmp_path):
    work, env = tmp_path, tool_env()
    git_copy(work, env)
    run([*DVC, "repro"], work, env)
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-q", "-m", "baseline"], work, env)
    baseline = json.loads((work / "metrics" / "eval.json").read_text())

    run([*DVC, "exp", "run", "-S", "align.alpha=0.5"], work, env)  # retrains molar
    assert load_params(work / "params.yaml").align.alpha == 0.5
    run([*DVC, "exp", "run", "-S", "eval.ks=[5,10]"], work, env)  # re-evaluates, alpha still 0.5
    params = load_params(work / "params.yaml")
    assert (params.align.alpha, params.eval.ks) == (0.5, [5, 10])

    diff = json.loads(run([*DVC, "metrics", "diff", "--json"], work, env)).get("metrics/eval.json", {})
    molar = {key.split(".", 1)[1]: change for key, change in diff.items() if key.startswith("molar.")}
    assert any(change.get("old") is not None and change.get("diff") for change in molar.values()), diff
    for key in ("ndcg@5", "recall@5"):  # new cut-offs: absent at the baseline commit
        assert key not in baseline["molar"] and molar[key]["old"] is None, diff
        assert 0.0 <= molar[key]["new"] <= 1.0, diff
    current = json.loads((work / "metrics" / "eval.json").read_text())
    assert set(current["molar"]) == {f"{m}@{k}" for m in ("ndcg", "recall") for k in (5, 10)}
