"""dueg.item_id_embedding: early ID fusion, a learned ID vector per item added at DUEG's input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_dueg import tiny_decoder  # tests/test_dueg.py
from test_id_dueg import ITEM_DIM, N_ITEMS, a_batch, catalog  # tests/test_id_dueg.py

from molar.config import DuegParams, Params, TrainParams
from molar.models.molar import (
    CachedItems,
    ItemIdEmbedding,
    MolarModel,
    MolarObjective,
    ObjectiveSettings,
    build_model,
)

KINDS = ["llm", "sasrec", "fpmc"]  # the LLM decoder, a tied and an untied ID encoder
HISTORIES = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12]]


def molar_of(kind: str, item_id_embedding: bool, seed: int = 0) -> MolarModel:
    """A fresh Molar (dropout off); the same seed gives the same draws up to the ID table."""
    torch.manual_seed(seed)
    extra = {} if kind == "llm" else {kind: Params.model_fields[kind].default.model_copy(update={"dropout": 0.0})}
    params = Params(dueg=DuegParams(kind=kind, item_id_embedding=item_id_embedding), train=TrainParams(max_length=6), **extra)
    decoder = tiny_decoder("llama", hidden=ITEM_DIM, seed=seed) if kind == "llm" else None
    return build_model(decoder, CachedItems(catalog()), params, id_dim=8)


@pytest.mark.parametrize("kind", KINDS)
def test_flag_off_is_the_content_model_and_on_only_adds_the_table(kind: str) -> None:
    off, on = molar_of(kind, False).eval(), molar_of(kind, True).eval()
    assert off.item_ids is None and not any(k.startswith("item_ids.") for k in off.state_dict())
    # the table is built last: every other weight is drawn exactly as without it
    shared = {k: v for k, v in on.state_dict().items() if not k.startswith("item_ids.")}
    assert shared.keys() == off.state_dict().keys()
    assert all(torch.equal(v, off.state_dict()[k]) for k, v in shared.items())
    assert not torch.equal(on.score(HISTORIES), off.score(HISTORIES))
    with torch.no_grad():  # a zero ID table is the content-only model, score for score
        for p in on.item_ids.parameters():
            p.zero_()
    assert torch.equal(on.score(HISTORIES), off.score(HISTORIES))


@pytest.mark.parametrize("kind", KINDS)
def test_table_widths_padding_row_and_init_scale(kind: str) -> None:
    model = molar_of(kind, True)
    ids = model.item_ids
    table = model.items.table
    inputs = model.dueg.project_items(table[1:]).detach()
    assert ids.inputs.weight.shape == (N_ITEMS + 1, inputs.shape[-1])
    untied = kind == "fpmc"  # FPMC scores its own output vectors: a candidate table of the scoring width
    assert (ids.candidates is not None) == untied
    if untied:
        assert ids.candidates.weight.shape == (N_ITEMS + 1, model.config.hidden_size)
    for t in ids.parameters():
        assert torch.equal(t[0], torch.zeros(t.shape[1]))
    rms = inputs.pow(2).mean().sqrt().item()
    assert ids.inputs.weight[1:].std().item() == pytest.approx(0.02 * rms, rel=0.25)


@pytest.mark.parametrize("kind", KINDS)
def test_the_table_trains_and_its_padding_row_stays_zero(kind: str) -> None:
    model = molar_of(kind, True).train()
    objective = MolarObjective(ObjectiveSettings(n_items=N_ITEMS, alpha=0.0), id_model=None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.item_ids.named_parameters()}
    for _ in range(2):
        optimizer.zero_grad()
        torch.manual_seed(7)
        loss, _ = objective(model, a_batch())
        loss.backward()
        for name, p in model.item_ids.named_parameters():
            assert p.grad is not None and p.grad[1:].abs().sum() > 0, name
            assert torch.equal(p.grad[0], torch.zeros_like(p.grad[0])), name
        optimizer.step()
    for name, p in model.item_ids.named_parameters():
        assert torch.equal(p[0], torch.zeros_like(p[0])) and not torch.equal(p, before[name]), name


@pytest.mark.parametrize("kind", KINDS)
def test_save_and_load_give_identical_scores(kind: str, tmp_path) -> None:
    model = molar_of(kind, True)
    with torch.no_grad():
        for p in model.item_ids.parameters():
            p[1:].add_(torch.randn_like(p[1:]))
    model.eval()
    model.save_pretrained(tmp_path / "molar")
    assert json.loads((tmp_path / "molar/molar.json").read_text())["item_id_embedding"] is True
    loaded = MolarModel.from_pretrained(tmp_path / "molar")
    assert loaded.config == model.config and isinstance(loaded.item_ids, ItemIdEmbedding)
    assert torch.equal(loaded.score(HISTORIES), model.score(HISTORIES))


def test_a_checkpoint_without_the_flag_loads_without_the_table(tmp_path) -> None:
    model = molar_of("sasrec", False).eval()
    model.save_pretrained(tmp_path / "molar")
    meta_path = tmp_path / "molar/molar.json"
    meta = json.loads(meta_path.read_text())
    del meta["item_id_embedding"]  # written before early fusion existed
    meta_path.write_text(json.dumps(meta))
    loaded = MolarModel.from_pretrained(tmp_path / "molar")
    assert loaded.config.item_id_embedding is False and loaded.item_ids is None
    assert not any(k.startswith("item_ids.") for k in load_file(str(tmp_path / "molar/model.safetensors")))
    assert torch.equal(loaded.score(HISTORIES), model.score(HISTORIES))
