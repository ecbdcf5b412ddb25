import json

import numpy as np
import pytest
import torch

from molar import losses
from molar.config import Gru4recParams
from molar.models.gru4rec import GRU4Rec, Gru4recConfig
from molar.models.id_model import SequentialRecommender, left_pad

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(n_items=12, num_layers=2, seed=0, **kw) -> GRU4Rec:
    torch.manual_seed(seed)
    config = dict(n_items=n_items, embedding_size=6, hidden_size=8, num_layers=num_layers, dropout=0.3, max_length=10) | kw
    return GRU4Rec(Gru4recConfig(**config)).eval()


def test_shapes_and_the_padding_row():
    model = _model()
    assert isinstance(model, SequentialRecommender)
    assert model.encode(torch.tensor([[0, 1, 2], [3, 4, 5]])).shape == (2, 3, 6)  # [B, L, embedding_size]
    assert model.item_embeddings().shape == (13, 6)
    assert torch.all(model.item_embeddings()[0] == 0)
    assert model.score([[1, 2], [3]]).shape == (2, 13)


def test_from_params_takes_the_section_and_recboles_defaults():
    model = GRU4Rec.from_params(30, Gru4recParams())
    assert model.config == Gru4recConfig(n_items=30, embedding_size=64, hidden_size=128, num_layers=1, dropout=0.3, max_length=50)
    assert model.gru.hidden_size == 128 and model.item_embeddings().shape == (31, 64)


def test_padding_never_changes_a_user_vector():
    model = _model()
    history = [3, 4, 5]
    unpadded = model.encode(torch.tensor([history]))[:, -1]
    for pad in (1, 4):
        padded = model.encode(torch.tensor([[0] * pad + history]))
        assert torch.allclose(padded[:, -1], unpadded, atol=1e-6)
        assert torch.allclose(padded[:, pad:], model.encode(torch.tensor([history])), atol=1e-6)  # every real position
    # the same history beside a longer batch mate (more padding), and via user_vectors
    with_mate = model.user_vectors([history, [1, 2, 3, 4, 5, 6, 7]])[:1]
    assert torch.allclose(with_mate, unpadded, atol=1e-6)


def test_padding_keeps_the_state_at_its_initial_value_in_every_layer():
    model = _model(num_layers=3)
    _, h = model.gru(torch.zeros(1, 5, 6))  # what padding positions feed the GRU
    assert torch.equal(h, torch.zeros_like(h))


def test_encoding_is_causal():
    model = _model()
    a = model.encode(torch.tensor([[1, 2, 3, 4, 5]]))
    b = model.encode(torch.tensor([[1, 2, 3, 9, 10]]))  # only the last two items differ
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_score_is_a_dot_product_with_the_input_embeddings():
    model = _model()
    histories = [[1, 2, 3], [4]]
    expected = model.encode(left_pad(histories, 10))[:, -1] @ model.item_emb.weight.T  # tied, as RecBole
    assert torch.allclose(model.score(histories), expected, atol=1e-6)


def test_dropout_only_in_training_mode():
    model = _model()
    model.train()
    assert not torch.allclose(model.user_vectors([[1, 2, 3]]), model.user_vectors([[1, 2, 3]]))
    model.eval()
    assert torch.equal(model.user_vectors([[1, 2, 3]]), model.user_vectors([[1, 2, 3]]))


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "gru4rec")
    config = json.loads((tmp_path / "gru4rec" / "config.json").read_text())
    assert config == {"model": "gru4rec", "n_items": 12, "embedding_size": 6, "hidden_size": 8, "num_layers": 2, "dropout": 0.3, "max_length": 10}
    loaded = GRU4Rec.from_pretrained(tmp_path / "gru4rec")
    assert not loaded.training
    histories = [[1, 2, 3], [4, 5]]
    assert torch.equal(loaded.score(histories), model.score(histories))


def test_learns_a_deterministic_next_item_rule():
    """Item i is always followed by i + 1: after training, the top item after any prefix is its successor."""
    n_items, max_length = 20, 8
    rng = np.random.default_rng(0)

    def runs(n):  # sequences i, i+1, ... of random start and length within the catalog
        out = []
        for _ in range(n):
            length = int(rng.integers(2, max_length + 2))
            start = int(rng.integers(1, n_items - length + 2))
            out.append(list(range(start, start + length)))
        return out

    train = left_pad(runs(256), max_length + 1)
    inputs, targets = train[:, :-1], train[:, 1:]
    targets = targets.masked_fill(inputs == 0, 0)  # a padding input has nothing to predict from
    torch.manual_seed(0)
    model = GRU4Rec(Gru4recConfig(n_items=n_items, embedding_size=16, hidden_size=32, num_layers=1, dropout=0.1, max_length=max_length))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(150):
        rows = torch.from_numpy(rng.choice(len(train), 64, replace=False))
        loss = losses.next_item_loss("ce", model(inputs[rows]), targets[rows], model.item_embeddings(), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()

    held_out = [run[: int(rng.integers(1, len(run)))] for run in runs(200)]  # prefixes, each with a successor
    with torch.no_grad():
        top = model.score(held_out)[:, 1:].argmax(1) + 1  # column 0 is padding, never recommended
    recall_at_1 = (top == torch.tensor([h[-1] + 1 for h in held_out])).float().mean().item()
    assert recall_at_1 >= 0.95
