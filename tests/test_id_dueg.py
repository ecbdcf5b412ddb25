"""dueg.kind sasrec | gru4rec | fpmc: an ID model's encoder as Molar's user model over MIRM item vectors."""

from __future__ import annotations

import typing

import pytest
import torch

from molar.config import AlignParams, DuegParams, Params, TrainParams
from molar.errors import UserError
from molar.models.id_dueg import IdDueg
from molar.models.molar import (
    CachedItems,
    MolarModel,
    MolarObjective,
    ObjectiveSettings,
    build_model,
)
from molar.models.registry import load_id_model
from molar.models.sasrec import SASRec, SasrecConfig

KINDS = [k for k in typing.get_args(DuegParams.model_fields["kind"].annotation) if k != "llm"]
N_ITEMS, ITEM_DIM = 12, 16


def catalog(n_items: int = N_ITEMS, dim: int = ITEM_DIM, seed: int = 0) -> torch.Tensor:
    """A MIRM-like table [n_items + 1, dim]: random rows sharing one large direction, row 0 padding."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(n_items + 1, dim, generator=g) + 5.0 * torch.ones(dim)
    table[0] = 0
    return table


def molar_of(kind: str, *, max_length: int = 6, seed: int = 0, table: torch.Tensor | None = None) -> MolarModel:
    """A fresh Molar with the ``kind`` user model; dropout off so that train mode is deterministic."""
    torch.manual_seed(seed)
    params = Params(
        dueg=DuegParams(kind=kind),
        train=TrainParams(max_length=max_length),
        **{kind: Params.model_fields[kind].default.model_copy(update={"dropout": 0.0})},
    )
    return build_model(None, CachedItems(catalog() if table is None else table), params, id_dim=8)


def left_padded(lengths: list[int], width: int) -> torch.Tensor:
    real = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        real[row, width - n :] = True
    return real


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_and_one_width_per_space(kind: str) -> None:
    model = molar_of(kind).eval()
    dueg = model.dueg
    assert isinstance(dueg, IdDueg) and model.config.dueg_kind == kind
    inputs = dueg.project_items(torch.randn(3, 5, ITEM_DIM))
    users = dueg(inputs, left_padded([5, 2, 1], 5), torch.tensor([1, 4]))
    assert users.shape == (3, 2, dueg.hidden_size) == (3, 2, model.config.hidden_size)
    assert (inputs.shape[-1], dueg.hidden_size) == WIDTHS[kind]
    assert model.catalog_vectors().shape == (N_ITEMS + 1, dueg.hidden_size)
    assert model.score([[1, 2, 3], [4]]).shape == (2, N_ITEMS + 1)
    # the ID tables are never read: the encoder is built for one item, its tables (only) frozen
    assert dueg.encoder.n_items == 1
    frozen = {n for n, p in dueg.encoder.named_parameters() if not p.requires_grad}
    assert frozen == FROZEN[kind]


WIDTHS = {  # (encoder input, user vector) at the default sections
    "sasrec": (64, 64),  # sasrec.hidden_size
    "gru4rec": (64, 64),  # gru4rec.embedding_size in and out (the GRU's 128 is inside)
    "fpmc": (128, 128),  # fpmc.hidden_size: two factors of 64 each side
}
FROZEN = {  # what encode_vectors never reads (pos_emb, SASRec's positions, it does read)
    "sasrec": {"item_emb.weight"},
    "gru4rec": {"item_emb.weight"},
    "fpmc": {"history_emb.weight", "item_user_emb.weight", "last_item_emb.weight", "item_last_emb.weight"},
}


@pytest.mark.parametrize("kind", KINDS)
def test_padding_and_batch_company_never_change_a_user_vector(kind: str) -> None:
    dueg = molar_of(kind).dueg.eval()
    torch.manual_seed(1)
    history = dueg.project_items(torch.randn(1, 4, ITEM_DIM))
    with torch.no_grad():
        alone = dueg(history, torch.ones(1, 4, dtype=torch.bool), torch.arange(4))
        junk = dueg.project_items(torch.randn(1, 3, ITEM_DIM))  # any value in the padding columns
        other = dueg.project_items(torch.randn(1, 7, ITEM_DIM))
        batch = torch.cat([torch.cat([junk, history], dim=1), other])
        real = torch.cat([left_padded([4], 7), torch.ones(1, 7, dtype=torch.bool)])
        in_batch = dueg(batch, real, torch.arange(3, 7))[:1]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_user_vector_at_a_column_sees_only_items_up_to_it(kind: str) -> None:
    dueg = molar_of(kind).dueg.eval()
    torch.manual_seed(2)
    items = dueg.project_items(torch.randn(1, 5, ITEM_DIM))
    later = items.clone()
    later[:, 3:] = dueg.project_items(torch.randn(1, 2, ITEM_DIM))  # items after column 2 changed
    ones = torch.ones(1, 5, dtype=torch.bool)
    with torch.no_grad():
        a, b = dueg(items, ones, torch.arange(5)), dueg(later, ones, torch.arange(5))
    torch.testing.assert_close(a[:, :3], b[:, :3], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:], atol=1e-4)  # ...and the later users do see them


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_identical_scores(kind: str, tmp_path) -> None:
    model = molar_of(kind)
    with torch.no_grad():  # move every trainable weight off its init, so that a missed one shows
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    model.eval()
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12]]
    before = model.score(histories)
    model.save_pretrained(tmp_path / "molar")
    loaded = MolarModel.from_pretrained(tmp_path / "molar")
    assert isinstance(loaded.dueg, IdDueg) and loaded.config == model.config
    assert torch.equal(loaded.score(histories), before)
    # no LLM decoder saved; the encoder is a regular ID-model checkpoint, its weights stored there only
    assert not (tmp_path / "molar/decoder").exists()
    assert type(load_id_model(tmp_path / "molar/user_model")) is type(model.dueg.encoder)
    from safetensors.torch import load_file

    assert not any(k.startswith("dueg.encoder.") for k in load_file(str(tmp_path / "molar/model.safetensors")))


def test_inputs_and_candidates_follow_the_id_models_tying() -> None:
    table = catalog()
    for kind in ("sasrec", "gru4rec"):  # one shared table: one adapter for inputs and candidates
        dueg = molar_of(kind).dueg
        assert dueg.candidate_proj is None and torch.equal(dueg.project_candidates(table), dueg.project_items(table))
    fpmc = molar_of("fpmc").dueg  # [H ; LI] read, [IU ; IL] scored: a second adapter for the candidates
    assert fpmc.candidate_proj is not None
    assert not torch.allclose(fpmc.project_candidates(table), fpmc.project_items(table))


@pytest.mark.parametrize("kind", KINDS)
def test_whitened_items_enter_at_the_id_models_init_scale(kind: str) -> None:
    from molar.models.registry import id_model_class

    model = molar_of(kind, table=catalog(n_items=40, dim=8))
    torch.manual_seed(0)
    section = getattr(Params(), kind)
    full = id_model_class(kind).from_params(40, section)  # its own tables for this catalog
    expected = full.input_vectors(torch.arange(1, 41).unsqueeze(0)).pow(2).mean().sqrt().item()
    with torch.no_grad():
        inputs = model.dueg.project_items(model.items.table[1:])
    # whitened catalog: covariance scale^2 x identity (8 dims; sample covariance over 40 items, so the
    # mean squared norm is 8 x 39/40 scale^2); the learned map starts as an isometry into the wider input
    assert inputs.pow(2).sum(1).mean().sqrt().item() == pytest.approx(expected * (8 * 39 / 40) ** 0.5, rel=1e-3)


def test_history_longer_than_the_encoder_reads_is_a_user_error() -> None:
    from molar.config import SasrecParams

    with pytest.raises(UserError, match=r"train.max_length \(20\) > sasrec.max_length \(10\)"):
        build_model(None, CachedItems(catalog()), Params(dueg=DuegParams(kind="sasrec"), sasrec=SasrecParams(max_length=10)), id_dim=8)


# -------------------------------------------------------------------- the joint objective
def a_batch() -> dict:
    inputs = torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 8], [0, 0, 0, 9, 10], [0, 11, 12, 1, 2]])
    targets = torch.tensor([[0, 0, 2, 3, 4], [5, 6, 7, 8, 9], [0, 0, 0, 10, 11], [0, 12, 1, 2, 3]])
    return {"inputs": inputs, "targets": targets, "step": 0}


def gradients(model: MolarModel, objective: MolarObjective) -> tuple[dict[str, torch.Tensor], dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same negatives for every objective
    loss, logs = objective(model, a_batch())
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, logs


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_is_the_bce_gradient_and_alpha_positive_trains_every_parameter(kind: str) -> None:
    model = molar_of(kind).train()
    torch.manual_seed(5)
    sasrec = SASRec(SasrecConfig(n_items=N_ITEMS, hidden_size=8, num_blocks=1, dropout=0.0, max_length=10)).eval()
    zero = ObjectiveSettings(n_items=N_ITEMS, alpha=0.0)
    bce_only, _ = gradients(model, MolarObjective(zero, id_model=None))
    with_zero, logs = gradients(model, MolarObjective(zero, id_model=sasrec))
    assert bce_only.keys() == with_zero.keys() and all(torch.equal(bce_only[n], with_zero[n]) for n in bce_only)
    assert logs["align"] > 0 and logs["loss"] == logs["bce"]
    half = ObjectiveSettings(n_items=N_ITEMS, alpha=0.5)
    aligned, logs = gradients(model, MolarObjective(half, id_model=sasrec))
    assert logs["loss"] == pytest.approx(logs["bce"] + 0.5 * logs["align"], rel=1e-5)
    # every trainable parameter gets a gradient (none unused: DDP-safe), the frozen ID model none
    assert aligned.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.grad is None for p in sasrec.parameters())


# --------------------------------------------------------------------------- it learns
def rule_data(n_items: int = 30, users: int = 60, length: int = 8, seed: int = 0):
    """Histories that follow one deterministic successor permutation from a random start."""
    g = torch.Generator().manual_seed(seed)
    successor = torch.randperm(n_items, generator=g) + 1  # successor[i - 1] follows item i
    successor = torch.where(successor == torch.arange(1, n_items + 1), successor % n_items + 1, successor)
    sequences = []
    for _ in range(users):
        item = int(torch.randint(1, n_items + 1, (1,), generator=g))
        seq = [item]
        for _ in range(length):
            item = int(successor[item - 1])
            seq.append(item)
        sequences.append(seq)
    return sequences


@pytest.mark.parametrize("kind,alpha", [("sasrec", 0.0), ("sasrec", 0.1), ("gru4rec", 0.0), ("fpmc", 0.0)])
def test_train_molar_learns_a_deterministic_next_item_rule(kind: str, alpha: float, tmp_path, one_torch_thread) -> None:
    from molar.evaluate import evaluate_scorer
    from molar.recipes.molar import load_scorer, train_molar

    sequences = rule_data()
    train = [s[:-1] for s in sequences]
    histories, targets = [s[:-1] for s in sequences[:20]], [s[-1] for s in sequences[:20]]
    table = catalog(n_items=30)
    params = Params(
        seed=0,
        dueg=DuegParams(kind=kind),
        train=TrainParams(max_length=8, epochs=15, patience=15, batch_size=16, lr=5e-3, warmup_ratio=0.0),
        align=AlignParams(alpha=alpha),
    )
    torch.manual_seed(0)
    model = build_model(None, CachedItems(table), params, id_dim=8)
    torch.manual_seed(1)
    id_model = SASRec(SasrecConfig(n_items=30, hidden_size=8, num_blocks=1, dropout=0.0, max_length=10)).eval()
    chance = evaluate_scorer(load_scorer(model), histories, targets, 30, ks=(10,), progress=False)["ndcg@10"]
    result, _ = train_molar(model, train, histories, targets, params, id_model, tmp_path / "state", f"rule-{kind}-{alpha}")
    assert 0 < result.best_epoch <= 15
    metrics = evaluate_scorer(load_scorer(model), histories, targets, 30, ks=(1, 10), progress=False)
    assert metrics["recall@1"] >= 0.9, (chance, metrics)
    assert chance < 0.5


@pytest.mark.parametrize("kind", KINDS)
def test_item_adapter_lr_covers_the_input_and_candidate_adapters(kind: str) -> None:
    from molar.recipes.molar import param_groups

    model = molar_of(kind)
    dueg = model.dueg
    adapters = [dueg.item_proj] + ([] if dueg.candidate_proj is None else [dueg.candidate_proj])
    expected = {id(p) for adapter in adapters for p in adapter.parameters()}
    rest, adapter = param_groups(model, TrainParams(lr=1e-3, item_adapter_lr_scale=3.0))
    assert expected and {id(p) for p in adapter["params"]} == expected and adapter["lr"] == pytest.approx(3e-3)
    assert {id(p) for p in dueg.encoder.parameters()} <= {id(p) for p in rest["params"]}
