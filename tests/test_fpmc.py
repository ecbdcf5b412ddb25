import json

import numpy as np
import pytest
import torch

from molar import losses
from molar.config import FpmcParams, ParamsError, parse_params
from molar.errors import UserError
from molar.models.fpmc import FPMC, FpmcConfig
from molar.models.id_model import SequentialRecommender, left_pad
from successor_data import successor_sequences  # tests/successor_data.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(n_items=12, max_length=6, seed=0, **kw) -> FPMC:
    torch.manual_seed(seed)
    return FPMC(FpmcConfig(n_items=n_items, hidden_size=8, max_length=max_length, **kw)).eval()


def test_shapes_and_padding_row_zero():
    model = _model()
    assert isinstance(model, SequentialRecommender)
    assert model.encode(torch.tensor([[0, 1, 2], [3, 4, 5]])).shape == (2, 3, 8)
    assert model.item_embeddings().shape == (13, 8)
    assert torch.all(model.item_embeddings()[0] == 0)
    assert model.score([[1, 2], [3], []]).shape == (3, 13)


def test_score_is_fpmc_with_the_mean_history_as_user_factor():
    model = _model()
    h, iu, li, il = (t.weight for t in (model.history_emb, model.item_user_emb, model.last_item_emb, model.item_last_emb))
    history = [3, 7, 5]
    expected = (h[history].mean(0) @ iu.T) + (li[5] @ il.T)  # <UI_u, IU_j> + <LI_l, IL_j>, l = 5
    assert torch.allclose(model.score([history])[0], expected, atol=1e-6)


def test_left_padding_never_changes_a_user_vector():
    model = _model()
    short = model.encode(torch.tensor([[3, 4, 5]]))
    padded = model.encode(torch.tensor([[0, 0, 0, 3, 4, 5]]))
    assert torch.allclose(padded[:, 3:], short, atol=1e-6)
    assert torch.all(padded[:, :3] == 0)  # padding positions carry no vector
    alone = model.user_vectors([[3, 4, 5]])
    with_long_mate = model.user_vectors([[3, 4, 5], [1, 2, 3, 4, 5, 6]])[:1]
    assert torch.allclose(alone, with_long_mate, atol=1e-6)


def test_encode_is_causal():
    a = _model().encode(torch.tensor([[1, 2, 3, 4, 5]]))
    b = _model().encode(torch.tensor([[1, 2, 3, 9, 10]]))  # only the last two items differ
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6)
    assert not torch.allclose(a[:, 3:], b[:, 3:])


def test_history_is_truncated_to_max_length():
    model = _model()
    assert torch.allclose(model.user_vectors([list(range(1, 13))]), model.user_vectors([list(range(7, 13))]), atol=1e-6)
    with pytest.raises(ValueError, match="max_length"):
        model.encode(torch.ones(1, 7, dtype=torch.long))


def test_dropout_only_in_training_mode():
    model = _model(dropout=0.5).train()
    torch.manual_seed(1)
    assert not torch.allclose(model.user_vectors([[1, 2, 3]]), model.user_vectors([[1, 2, 3]]))
    model.eval()
    assert torch.equal(model.user_vectors([[1, 2, 3]]), model.user_vectors([[1, 2, 3]]))


def test_width_must_hold_two_factors():
    with pytest.raises(UserError, match="even"):
        FpmcConfig(n_items=5, hidden_size=7)
    with pytest.raises(ParamsError, match="fpmc.hidden_size"):
        parse_params("fpmc:\n  hidden_size: 7\n")


def test_from_params_uses_the_section():
    model = FPMC.from_params(9, FpmcParams(hidden_size=6, dropout=0.1, max_length=4))
    assert model.config == FpmcConfig(n_items=9, hidden_size=6, dropout=0.1, max_length=4)
    assert FPMC.from_params(9, FpmcParams()).config.hidden_size == 128  # 2 x RecBole's embedding_size 64


def test_save_and_load_round_trip(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "fpmc")
    config = json.loads((tmp_path / "fpmc" / "config.json").read_text())
    assert config == {"model": "fpmc", "n_items": 12, "hidden_size": 8, "dropout": 0.0, "max_length": 6}
    loaded = FPMC.from_pretrained(tmp_path / "fpmc")
    assert not loaded.training
    histories = [[1, 2, 3], [4, 5], []]
    assert torch.equal(loaded.score(histories), model.score(histories))


def test_learns_that_item_i_is_followed_by_i_plus_1():
    n_items, max_length = 20, 8
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = FPMC(FpmcConfig(n_items=n_items, hidden_size=16, max_length=max_length))
    train = left_pad([s[-(max_length + 1) :] for s in successor_sequences(rng, n_items, 200)], max_length + 1)
    inputs, targets = train[:, :-1], train[:, 1:]
    targets = targets.masked_fill(inputs == 0, 0)  # a padding input predicts nothing
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(100):
        loss = losses.next_item_loss("ce", model(inputs), targets, model.item_embeddings(), 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    # held-out prefixes: fresh runs cut at a random point; the answer is the last item + 1
    prefixes = [s[: int(rng.integers(1, len(s)))] for s in successor_sequences(rng, n_items, 100)]
    with torch.no_grad():
        top1 = model.score(prefixes)[:, 1:].argmax(dim=1) + 1  # column 0 is padding, never recommended
    recall_at_1 = (top1 == torch.tensor([p[-1] + 1 for p in prefixes])).float().mean().item()
    assert recall_at_1 >= 0.95
