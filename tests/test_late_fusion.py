"""Late ID fusion: molar+sasrec = z(Molar) + w x z(SASRec), w chosen on validation (molar/models/late_fusion.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from molar.errors import UserError
from molar.models.late_fusion import LateFusionConfig, components_of, fuse, standardise
from molar.recipes.late_fusion import choose_weight

U = 1 / math.sqrt(5)  # {3, 1, -1, -3} x U has mean 0 and population std 1: already standardised
# two users, both with target item 1 (histories name the user; no masking)
BASE = {1: [0.0, U, 3 * U, -U, -3 * U], 2: [0.0, 3 * U, -U, U, -3 * U]}
ADDED = {1: [0.0, 3 * U, -3 * U, U, -U], 2: [0.0, -U, 3 * U, -3 * U, U]}
HISTORIES, TARGETS = [[1], [2]], [1, 1]


def table_scorer(rows: dict[int, list[float]], scale: float = 1.0, shift: float = 0.0):
    return lambda histories: torch.tensor([[scale * v + shift for v in rows[h[0]]] for h in histories])


def test_standardise_each_row_over_the_catalog() -> None:
    scores = torch.tensor([[9.0, 1.0, 2.0, 3.0], [-4.0, 5.0, 5.0, 5.0]])
    z = standardise(scores)
    s = math.sqrt(2 / 3)
    assert torch.allclose(z[0], torch.tensor([0.0, -1 / s, 0.0, 1 / s]))
    assert torch.equal(z[1], torch.zeros(4))  # no spread: no say in the ranking, no NaN


def test_fused_scores_are_the_manual_arithmetic() -> None:
    base = lambda h: torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # z = (-1, 0, 1) / sqrt(2/3)
    added = lambda h: torch.tensor([[5.0, 30.0, 10.0, 20.0]])  # z = (1, -1, 0) / sqrt(2/3)
    s = math.sqrt(2 / 3)
    fused = fuse(base, added, 2.0)([[1]])
    assert torch.allclose(fused, torch.tensor([[0.0, 1 / s, -2 / s, 1 / s]]))
    assert torch.allclose(fuse(base, added, 0.5)([[1]]), torch.tensor([[0.0, -0.5 / s, -0.5 / s, 1 / s]]))
    assert torch.equal(fuse(base, added, 0.0)([[1]]), standardise(base([[1]])))
    with pytest.raises(ValueError, match=">= 0"):
        fuse(base, added, -1.0)


def test_the_weight_is_chosen_on_validation() -> None:
    # user 1 ranks its target first iff w > 1/3 (base puts item 2 above it), user 2 iff w < 1
    # (added puts item 2 above it): of the grid only w = 0.5 ranks both first
    base, added = table_scorer(BASE, scale=10.0, shift=7.0), table_scorer(ADDED, scale=0.1)  # any scale: standardised
    best, ndcg = choose_weight(base, added, HISTORIES, TARGETS, 4, [4.0, 0.0, 0.25, 0.5, 2.0], mask_history=False)
    second = 1 / math.log2(3)  # NDCG of a target ranked second
    assert best == 0.5 and list(ndcg) == [0.0, 0.25, 0.5, 2.0, 4.0]
    assert ndcg[0.5] == pytest.approx(1.0)
    for w in (0.0, 0.25, 2.0):
        assert ndcg[w] == pytest.approx((1 + second) / 2), w
    assert ndcg[4.0] == pytest.approx((1 + 0.5) / 2)  # user 2: items 2 (3 x 4 - 1 = 11) and 4 (4 - 3) above 3 - 4
    # a tie goes to the smaller w: the least ID knowledge that does as well
    best, _ = choose_weight(base, added, HISTORIES, TARGETS, 4, [0.75, 0.5], mask_history=False)
    assert best == 0.5


def test_names_and_config_round_trip(tmp_path) -> None:
    assert components_of("molar+sasrec") == ("molar", "sasrec")
    with pytest.raises(ValueError):
        components_of("molar")
    config = LateFusionConfig(("molar", "sasrec"), 0.5, {"0": 0.1, "0.5": 0.2}, {"molar": "a", "sasrec": "b"})
    config.save(tmp_path / "ens")
    assert LateFusionConfig.load(tmp_path / "ens") == config
    with pytest.raises(UserError, match="train-late-fusion"):
        LateFusionConfig.load(tmp_path / "none")


# ------------------------------------------------------------------------------ the stages
PARAMS = """\
seed: 3
data:
  synthetic: {n_users: 60, n_items: 30, min_length: 8, max_length: 12, image_size: 28}
sasrec:
  epochs: 2
  batch_size: 32
  max_length: 12
dueg:
  kind: sasrec
train:
  max_length: 10
late_fusion:
  weights: [0.0, 1.0, 4.0]
"""


def test_fit_and_evaluate_stages(tmp_path, monkeypatch, one_torch_thread) -> None:
    """train-late-fusion writes data/models/molar+sasrec/ from the frozen Molar and SASRec, and
    `molar evaluate --model molar+sasrec` scores the ensemble with that w (a stale fit is refused)."""
    from molar.config import load_params
    from molar.models.molar import CachedItems, build_model
    from stages import evaluate, ingest, split, train_id, train_late_fusion

    monkeypatch.chdir(tmp_path)
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS)
    ingest.main(params)
    split.main(params)
    train_id.main(params, model="sasrec")
    torch.manual_seed(0)  # an untrained Molar over random item vectors stands in for the trained one
    table = torch.randn(31, 16)
    table[0] = 0
    build_model(None, CachedItems(table), load_params(params), id_dim=None).eval().save_pretrained("data/models/molar")

    train_late_fusion.main(params)
    meta = json.loads((tmp_path / "data/models/molar+sasrec/config.json").read_text())
    assert meta["components"] == ["molar", "sasrec"] and set(meta["valid_ndcg"]) == {"0", "1", "4"}
    best = max(meta["valid_ndcg"].values())
    assert meta["valid_ndcg"][f"{meta['weight']:g}"] == best
    assert min(float(w) for w, v in meta["valid_ndcg"].items() if v == best) == meta["weight"]

    evaluate.main(params, model="molar+sasrec", merge=False)
    valid = json.loads((tmp_path / "metrics/by_model/molar+sasrec/valid.json").read_text())
    assert valid["ndcg@10"] == pytest.approx(best, abs=1e-6)  # the ensemble scored is the one fitted
    assert (tmp_path / "metrics/by_model/molar+sasrec/eval.json").exists()

    (tmp_path / "data/models/molar/molar.json").write_text((tmp_path / "data/models/molar/molar.json").read_text() + " ")
    with pytest.raises(SystemExit):  # the stage prints the UserError: fitted on another Molar
        evaluate.main(params, model="molar+sasrec", merge=False)
