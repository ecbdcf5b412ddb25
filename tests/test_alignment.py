"""Post-alignment loss (paper Eq. 4), the BCE with sampled negatives, and the joint objective's gradients."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModel, Qwen2VLTextConfig

from molar import losses
from molar.models.dueg import Dueg
from molar.models.molar import CachedItems, MolarConfig, MolarModel, MolarObjective, ObjectiveSettings, align_head_for
from molar.models.sasrec import SASRec, SasrecConfig

# The losses run in float32, through exp/log kernels whose last bits differ between CPUs and
# vector widths: a relative 1e-5 (~80 float32 ulps) leaves room for them, and any slip in the
# formulas below moves the loss by far more.
REL_FLOAT32 = 1e-5


# ------------------------------------------------------------------------- InfoNCE by hand
def test_symmetric_info_nce_matches_a_hand_computed_3x3_case() -> None:
    # Rows of x and y (scaled on purpose: only directions count). Cosine matrix S[i, j] = cos(x_i, y_j):
    #   x1 = 3 e1, x2 = e2, x3 = e3;  y1 = e1, y2 = 2 e2, y3 = e1
    #   S = [[1, 0, 1], [0, 1, 0], [0, 0, 0]];  tau = 0.5, so logits = 2 S.
    x = torch.tensor([[3.0, 0, 0], [0, 1, 0], [0, 0, 1]])
    y = torch.tensor([[1.0, 0, 0], [0, 2, 0], [1, 0, 0]])
    e2 = math.exp(2)
    # x -> y, row i against all y (label i):
    row = [-math.log(e2 / (2 * e2 + 1)), -math.log(e2 / (e2 + 2)), -math.log(1 / 3)]
    # y -> x, column j against all x: y1 -> [2, 0, 0], y2 -> [0, 2, 0], y3 -> [2, 0, 0] (label 2 scores 0)
    col = [-math.log(e2 / (e2 + 2)), -math.log(e2 / (e2 + 2)), -math.log(1 / (e2 + 2))]
    expected = 0.5 * (sum(row) / 3 + sum(col) / 3)
    got = losses.symmetric_info_nce(x, y, tau=0.5)
    assert got.item() == pytest.approx(expected, rel=REL_FLOAT32)
    # symmetric by construction: swapping the two sides gives the same loss
    assert losses.symmetric_info_nce(y, x, tau=0.5).item() == pytest.approx(expected, rel=REL_FLOAT32)


def test_info_nce_is_low_for_aligned_pairs_and_rejects_bad_input() -> None:
    a = torch.eye(4)
    assert losses.symmetric_info_nce(a, 5 * a, tau=0.05).item() < 1e-6
    assert losses.symmetric_info_nce(a, a.roll(1, 0), tau=0.05).item() > 10
    with pytest.raises(ValueError, match="one shape"):
        losses.symmetric_info_nce(torch.ones(3, 2), torch.ones(3, 4), tau=0.1)
    with pytest.raises(ValueError, match="tau"):
        losses.symmetric_info_nce(a, a, tau=0.0)


# ----------------------------------------------------------------------------- BCE pieces
def test_uniform_negatives_never_hit_the_positive_and_cover_the_rest_evenly() -> None:
    torch.manual_seed(0)
    targets = torch.full((40000,), 3)
    neg = losses.uniform_negatives(targets, n_items=5, k=1)
    assert neg.shape == (40000, 1) and not bool((neg == 3).any())
    counts = torch.bincount(neg.view(-1), minlength=6)[1:].float()
    assert counts[2] == 0 and bool((counts[[0, 1, 3, 4]] / 40000 - 0.25).abs().max() < 0.01)
    many = losses.uniform_negatives(torch.tensor([1, 2]), n_items=3, k=7)
    assert many.shape == (2, 7) and not bool((many == torch.tensor([[1], [2]])).any()) and int(many.min()) >= 1


def test_pointwise_bce_by_hand() -> None:
    pos, neg = torch.tensor([0.0, 2.0]), torch.tensor([[0.0], [-1.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    expected = (-math.log(0.5) - math.log(sig(2))) / 2 + (-math.log(0.5) - math.log(1 - sig(-1))) / 2
    assert losses.pointwise_bce(pos, neg).item() == pytest.approx(expected, rel=REL_FLOAT32)
    # k negatives: the negative term is their mean, so one duplicated negative changes nothing
    assert losses.pointwise_bce(pos, neg.repeat(1, 3)).item() == pytest.approx(expected, rel=REL_FLOAT32)


def test_sampled_softmax_ce_masks_negatives_equal_to_the_positive() -> None:
    pos, neg = torch.tensor([1.0]), torch.tensor([[1.0, 0.0]])
    masked = losses.sampled_softmax_ce(pos, neg, torch.tensor([[True, False]]))
    assert masked.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=REL_FLOAT32)


# -------------------------------------------------------------------- the joint objective
N_ITEMS = 12


def tiny_molar(item_dim: int = 16, hidden: int = 32, id_dim: int = 8, seed: int = 0) -> MolarModel:
    torch.manual_seed(seed)
    config = Qwen2VLTextConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=5, bos_token_id=None, eos_token_id=None,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    decoder = AutoModel.from_config(config, attn_implementation="sdpa")
    table = torch.randn(N_ITEMS + 1, item_dim)
    table[0] = 0
    cfg = MolarConfig(n_items=N_ITEMS, item_dim=item_dim, hidden_size=hidden, id_dim=id_dim, max_length=6)
    return MolarModel(cfg, Dueg(decoder, item_dim), CachedItems(table), align_head_for(hidden, id_dim, project=True))


def tiny_sasrec(id_dim: int = 8) -> SASRec:
    torch.manual_seed(5)
    return SASRec(SasrecConfig(n_items=N_ITEMS, hidden_size=id_dim, num_blocks=1, num_heads=1, dropout=0.0, max_length=10)).eval()


def a_batch() -> dict:
    inputs = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 9, 10], [0, 11, 12, 1, 2]])
    targets = torch.tensor([[0, 0, 2, 3, 4], [5, 6, 7, 8, 9], [0, 0, 0, 10, 11], [0, 12, 1, 2, 3]])
    return {"inputs": inputs, "targets": targets, "step": 0}


def gradients(model: MolarModel, objective: MolarObjective, seed: int = 7) -> tuple[dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same negatives for every objective
    loss, logs = objective(model, a_batch())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logs


@pytest.mark.parametrize("positions", ["last", "all"])
def test_alpha_zero_gives_exactly_the_bce_only_gradient(positions: str) -> None:
    model, sasrec = tiny_molar(), tiny_sasrec()
    base = ObjectiveSettings(n_items=N_ITEMS, alpha=0.0, tau=0.1, align_positions=positions)
    bce_only, bce_logs = gradients(model, MolarObjective(base, id_model=None))
    with_zero, zero_logs = gradients(model, MolarObjective(base, id_model=sasrec))
    assert bce_only.keys() == with_zero.keys() and "align_head.weight" not in with_zero
    for name in bce_only:
        assert torch.equal(bce_only[name], with_zero[name]), name
    assert zero_logs["loss"] == bce_logs["loss"] == zero_logs["bce"]
    assert zero_logs["align"] > 0  # logged even though it does not train

    half = ObjectiveSettings(n_items=N_ITEMS, alpha=0.5, tau=0.1, align_positions=positions)
    aligned, logs = gradients(model, MolarObjective(half, id_model=sasrec))
    assert "align_head.weight" in aligned
    assert not torch.equal(aligned["dueg.user_token"], bce_only["dueg.user_token"])
    assert logs["loss"] == pytest.approx(logs["bce"] + 0.5 * logs["align"], rel=1e-5)
    # the ID model stays frozen: no gradient reaches it
    assert all(p.grad is None for p in sasrec.parameters())


def test_objective_logs_collapse_signals_and_stops_on_collapse() -> None:
    model = tiny_molar()
    objective = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, alpha=0.0, collapse_std=1e-4), id_model=None)
    _, logs = gradients(model, objective)
    assert 0 < logs["user_std"] < 1 and 0 < logs["item_std"] < 1 and 0 <= logs["live_negatives"] <= 1
    with torch.no_grad():  # every item the same vector: the item side has collapsed
        model.items.table[1:] = model.items.table[1]
    from molar.models.molar import CollapseError

    with pytest.raises(CollapseError, match="item embeddings collapsed"):
        objective(model, a_batch())


def test_align_head_is_linear_only_when_widths_differ() -> None:
    assert isinstance(align_head_for(32, 32, project=True), torch.nn.Identity)
    assert isinstance(align_head_for(32, 8, project=True), torch.nn.Linear)
    with pytest.raises(ValueError, match="align.project"):
        align_head_for(32, 8, project=False)


def test_last_position_mode_ignores_earlier_targets_and_sampled_ce_runs() -> None:
    model = tiny_molar()
    last_only = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, alpha=0.0, all_positions=False), id_model=None)
    batch = a_batch()
    torch.manual_seed(3)
    loss_a, _ = last_only(model, batch)
    changed = dict(batch, targets=batch["targets"].clone())
    changed["targets"][:, :-1] = torch.where(changed["targets"][:, :-1] > 0, 1, 0)  # earlier targets rewritten
    torch.manual_seed(3)
    loss_b, _ = last_only(model, changed)
    assert loss_a.item() == loss_b.item()
    torch.manual_seed(3)
    every, _ = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, alpha=0.0), id_model=None)(model, changed)
    assert every.item() != loss_a.item()

    sampled = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, loss="sampled_ce", num_negatives=5, alpha=0.2), id_model=tiny_sasrec())
    loss, logs = sampled(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and "sampled_ce" in logs and "bce" not in logs and 0 <= logs["live_negatives"] <= 1


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_shared_logits_equal_the_broadcast_scores(similarity: str) -> None:
    model = tiny_molar()
    object.__setattr__(model.config, "similarity", similarity)  # frozen dataclass: one test-only switch
    torch.manual_seed(1)
    users, items = torch.randn(5, 32), torch.randn(7, 32)
    broadcast = model.logits(users.unsqueeze(1), items.unsqueeze(0))  # [5, 7]
    assert torch.allclose(model.shared_logits(users, items), broadcast, rtol=1e-5, atol=1e-5)


def test_full_softmax_ce_is_cross_entropy_over_the_whole_catalog() -> None:
    # train.loss: ce: each kept position's user against every catalog item, the target its class
    model = tiny_molar()
    batch = a_batch()
    loss, logs = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, loss="ce", alpha=0.0), id_model=None)(model, batch)
    with torch.no_grad():
        columns = torch.arange(batch["inputs"].shape[1])
        table = model.items.table
        users = model.encode(batch["inputs"], table[batch["inputs"]], columns)  # [B, L, hidden]
        keep = batch["targets"] != 0
        scores = model.shared_logits(users[keep], model.catalog_vectors()[1:])  # [P, n_items]: item i in column i - 1
        expected = torch.nn.functional.cross_entropy(scores, batch["targets"][keep] - 1)
    assert logs["ce"] == pytest.approx(expected.item(), rel=REL_FLOAT32) and logs["loss"] == logs["ce"]
    assert "sampled_ce" not in logs and "bce" not in logs
    loss.backward()
    assert model.dueg.user_token.grad is not None and torch.isfinite(loss)
    # the full catalog is what sampled_ce gives with num_negatives >= n_items (all negatives, in some order)
    sampled = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, loss="sampled_ce", num_negatives=100, alpha=0.0), id_model=None)
    _, sampled_logs = sampled(model, batch)
    assert sampled_logs["sampled_ce"] == pytest.approx(logs["ce"], rel=REL_FLOAT32)
