"""dueg.item_adapter: mlp, the whiten adapter plus a GELU MLP over the cached item vectors."""

from __future__ import annotations

import json

import pytest
import torch
from test_dueg import tiny_decoder  # tests/test_dueg.py
from test_id_dueg import ITEM_DIM, catalog  # tests/test_id_dueg.py

from molar.config import DuegParams, Params, TrainParams
from molar.models.dueg import ItemWhitening, item_adapter_for
from molar.models.molar import CachedItems, MolarModel, build_model


def test_mlp_adapter_starts_as_whiten_and_trains_its_mlp_too() -> None:
    catalog = torch.randn(50, 8) * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1]) + 5.0
    torch.manual_seed(0)
    whiten = item_adapter_for(8, 8, "whiten", catalog, input_scale=0.5)
    torch.manual_seed(0)
    mlp = item_adapter_for(8, 8, "mlp", catalog, input_scale=0.5)
    trainable = {name for name, p in mlp.named_parameters()}
    assert trainable == {"1.linear.weight", "1.linear.bias", "1.up.weight", "1.up.bias", "1.down.weight", "1.down.bias"}
    assert mlp[1].up.out_features == 8  # as wide as the output
    assert torch.equal(mlp(catalog), whiten(catalog))  # the MLP's last layer starts at zero
    # after a step the MLP contributes: the gradient reaches `down` at once (its input is non-zero)
    mlp(catalog).pow(2).sum().backward()
    assert mlp[1].down.weight.grad.abs().sum() > 0


def test_mlp_adapter_places_more_items_freely_than_its_width_and_linear_cannot() -> None:
    # 10 items with 3-d content, each to be mapped to its own free 8-d target vector (what an ID
    # table can hold). A linear map of 3 dims (plus a bias) spans 4 directions of the 10 items:
    # its best fit (least squares, below) leaves a residual. The MLP's 8 hidden units add 8 more.
    gen = torch.Generator().manual_seed(0)
    content = torch.randn(10, 3, generator=gen)
    targets = torch.randn(10, 8, generator=gen)
    whitened = ItemWhitening(3, content)(content)
    design = torch.cat([whitened, torch.ones(10, 1)], dim=1)
    linear_best = (design @ torch.linalg.lstsq(design, targets).solution - targets).pow(2).mean()
    assert linear_best > 0.3  # far from zero: no linear map does it

    torch.manual_seed(0)
    adapter = item_adapter_for(3, 8, "mlp", content)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-2)
    for _ in range(2000):
        opt.zero_grad()
        loss = (adapter(content) - targets).pow(2).mean()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * linear_best.item()



@pytest.mark.parametrize("kind", ["llm", "sasrec"])
def test_a_molar_with_the_mlp_adapter_saves_and_loads_to_identical_scores(kind: str, tmp_path) -> None:
    torch.manual_seed(0)
    extra = {} if kind == "llm" else {kind: Params.model_fields[kind].default.model_copy(update={"dropout": 0.0})}
    params = Params(dueg=DuegParams(kind=kind, item_adapter="mlp"), train=TrainParams(max_length=6), **extra)
    decoder = tiny_decoder("llama", hidden=ITEM_DIM) if kind == "llm" else None
    model = build_model(decoder, CachedItems(catalog()), params, id_dim=8)
    with torch.no_grad():  # as after training: the MLP part no longer zero
        for name, p in model.named_parameters():
            if ".down." in name:
                p.add_(torch.randn_like(p))
    model.eval()
    model.save_pretrained(tmp_path / "molar")
    assert json.loads((tmp_path / "molar/molar.json").read_text())["item_adapter"] == "mlp"
    loaded = MolarModel.from_pretrained(tmp_path / "molar")
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11, 12]]
    assert torch.equal(loaded.score(histories), model.score(histories))
