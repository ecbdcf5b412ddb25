"""Content SASRec: SASRec over a learned projection of frozen item content (molar/models/content_sasrec.py)
and the item-content file it reads (molar/item_content.py)."""

from __future__ import annotations

import json

import pytest
import torch

from molar.config import SasrecContentParams
from molar.errors import MissingInputError, UserError
from molar.evaluate import evaluate_scorer
from molar.item_content import ITEM_CONTENT, read_item_content, save_item_content
from molar.models.content_sasrec import (
    ContentSasrecConfig,
    SasrecImage,
    SasrecText,
    SasrecTextImage,
)
from molar.models.registry import load_id_model
from molar.recipes.id_models import load_scorer, train_id_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

PARAMS = SasrecContentParams(hidden_size=8, num_blocks=1, num_heads=2, max_length=6)


def _content(n_items=12, width=5, seed=0) -> torch.Tensor:
    torch.manual_seed(seed)
    table = torch.randn(n_items + 1, width)
    table[0] = 0
    return table


def _model(content=None, seed=0, cls=SasrecText) -> SasrecText:
    content = _content() if content is None else content
    torch.manual_seed(seed)
    return cls.from_content(content, PARAMS).eval()


def test_shapes_and_the_padding_row():
    model = _model()
    padded = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])
    assert model.input_vectors(padded).shape == (2, 4, 8)
    assert model.encode(padded).shape == (2, 4, 8)
    items = model.item_embeddings()
    assert items.shape == (13, 8) and torch.all(items[0] == 0) and items[1:].abs().sum(1).gt(0).all()
    assert torch.all(model.input_vectors(padded)[0, :2] == 0)  # padding inputs are zero vectors
    scores = model.score([[1, 2], [3], []])
    assert scores.shape == (3, 13) and torch.isfinite(scores).all()
    assert torch.allclose(scores, model.user_vectors([[1, 2], [3], []]) @ items.T)


def test_items_are_the_projected_whitened_content_tied_on_both_sides():
    content = _content()
    model = _model(content)
    whitened = model.whitening(content[1:])
    assert torch.allclose(whitened.T @ whitened / 11, torch.eye(5), atol=1e-4)  # fixed catalog whitening
    assert torch.allclose(model.item_embeddings()[1:], model.projection(whitened))
    ids = torch.tensor([[5, 7]])
    assert torch.equal(model.input_vectors(ids)[0], model.item_embeddings()[[5, 7]])


def test_the_whitened_catalog_is_reused_and_follows_its_buffers():
    """Computed once while the buffers stay as they are; a load or an in-place change recomputes it."""
    model = _model(_content(seed=0))
    first = model.whitened_content()
    assert model.whitened_content() is first  # reused, not recomputed
    assert torch.equal(first, model.whitening(model.content[1:]))
    other = _model(_content(seed=3))
    model.load_state_dict(other.state_dict())  # copies into the same storage: only the version changes
    assert torch.equal(model.whitened_content(), other.whitening(other.content[1:]))
    assert torch.equal(model.item_embeddings(), other.item_embeddings())
    with torch.no_grad():
        model.content[2] += 1.0
    assert torch.equal(model.whitened_content(), model.whitening(model.content[1:]))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the autocast context is part of what it is computed from
        assert model.whitened_content().dtype == torch.bfloat16
    assert model.whitened_content().dtype == torch.float32


def test_padding_never_changes_a_user_vector():
    model = _model()
    alone = model.user_vectors([[3, 4, 5]])
    with_long_mate = model.user_vectors([[3, 4, 5], [1, 2, 3, 4, 5, 6]])[:1]
    explicit_padding = model.encode(torch.tensor([[0, 0, 0, 3, 4, 5]]))[:, -1]
    assert torch.allclose(alone, with_long_mate, atol=1e-6)
    assert torch.allclose(alone, explicit_padding, atol=1e-6)


def test_the_projection_sees_only_frozen_inputs():
    """No gradient reaches the content table or its whitening, and an optimizer step leaves them as they were."""
    model = _model().train()
    frozen = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert set(frozen) == {"content", "whitening.mean", "whitening.matrix"}
    assert not any(name.startswith(("content", "whitening")) for name, _ in model.named_parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    states = model(torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]]))
    loss = torch.nn.functional.cross_entropy((states @ model.item_embeddings().T).flatten(0, 1), torch.tensor([2, 3, 4, 5, 5, 6, 7, 8]))
    loss.backward()
    for name, buffer in model.named_buffers():
        assert not buffer.requires_grad and buffer.grad is None, name
    assert model.projection[0].weight.grad is not None and model.projection[0].weight.grad.abs().sum() > 0
    before = model.projection[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model.projection[0].weight, before)  # the step did train the projection
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, frozen[name]), name


def test_each_variant_concatenates_its_modalities_from_the_file(tmp_path):
    text, image = _content(width=3, seed=1), _content(width=2, seed=2)
    path = tmp_path / "content.safetensors"
    save_item_content(path, {"text": text, "image": image}, {"n_items": "12"})
    assert torch.equal(read_item_content(path, SasrecText.MODALITIES, 12), text)
    assert torch.equal(read_item_content(path, SasrecImage.MODALITIES, 12), image)
    assert torch.equal(read_item_content(path, SasrecTextImage.MODALITIES, 12), torch.cat([text, image], 1))


def test_item_content_file_errors_name_the_file_and_the_fix(tmp_path):
    path = tmp_path / "content.safetensors"
    with pytest.raises(MissingInputError, match=r"content\.safetensors: missing; run `molar item-content`"):
        read_item_content(path, ["text"], 12)
    save_item_content(path, {"text": _content()}, {"n_items": "12", "why_no_image": "no item has an image"})
    with pytest.raises(UserError, match=r"no image vectors \(no item has an image\); .*\(sasrec-text\)"):
        read_item_content(path, ["text", "image"], 12)
    with pytest.raises(UserError, match=r"text table of shape \(13, 5\), but the split has 20 items"):
        read_item_content(path, ["text"], 20)
    first = path.read_bytes()
    save_item_content(path, {"text": _content()}, {"n_items": "12", "why_no_image": "no item has an image"})
    assert path.read_bytes() == first  # byte-reproducible: DVC hashes bytes


def test_checkpoint_is_self_contained(tmp_path, monkeypatch):
    """The content table travels in the checkpoint: loading needs no item-content file."""
    monkeypatch.chdir(tmp_path)
    model = _model(cls=SasrecTextImage)
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model"] == "sasrec-text-image" and config["content_dim"] == 5 and config["n_items"] == 12
    assert not ITEM_CONTENT.exists()
    loaded = load_id_model(tmp_path / "m")
    assert type(loaded) is SasrecTextImage
    assert torch.equal(loaded.score([[1, 2, 3], [4]]), model.score([[1, 2, 3], [4]]))
    with pytest.raises(ValueError, match=r"expected \[13, 5\]"):
        SasrecText(ContentSasrecConfig(n_items=12, hidden_size=8, content_dim=5), torch.zeros(13, 4))


def _next_item_data(n_items=20, n_users=60, length=12):
    """Item i is always followed by i + 1 (n by 1): every user walks the cycle from a different start."""
    seqs = [[(u + i) % n_items + 1 for i in range(length)] for u in range(n_users)]
    train = [s[:-2] for s in seqs]
    return train, train, [s[-2] for s in seqs]


def test_learns_a_deterministic_next_item_rule_from_content_alone(tmp_path, monkeypatch):
    """Random content that tells the 20 items apart, the rule i -> i + 1: the top recommendation is the next item."""
    monkeypatch.chdir(tmp_path)
    save_item_content(ITEM_CONTENT, {"text": _content(n_items=20, width=16)}, {"n_items": "20"})
    train, histories, targets = _next_item_data()
    params = SasrecContentParams(hidden_size=16, num_blocks=1, dropout=0.0, max_length=8, batch_size=16, epochs=15, patience=15)
    model, result = train_id_model("sasrec-text", params, train, histories, targets, 20, seed=0, state_dir=tmp_path / "state")
    metrics = evaluate_scorer(load_scorer(model), histories, targets, 20, ks=[1], progress=False)
    assert metrics["recall@1"] >= 0.95, (metrics, result.history[-1])
    assert torch.equal(model.content, read_item_content(ITEM_CONTENT, ["text"], 20))  # trained, never changed

    # deterministic: a fresh run (its own state folder) repeats every epoch and weight exactly
    again, rerun = train_id_model("sasrec-text", params, train, histories, targets, 20, seed=0, state_dir=tmp_path / "state2")
    timeless = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]
    assert not rerun.resumed and timeless(rerun.history) == timeless(result.history)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_changed_content_starts_a_fresh_run(tmp_path, monkeypatch):
    """The run key covers the frozen content: a new item-content file never resumes the old run's state."""
    monkeypatch.chdir(tmp_path)
    train, histories, targets = _next_item_data()
    params = SasrecContentParams(hidden_size=8, num_blocks=1, max_length=8, batch_size=16, epochs=2, patience=2)
    runs = []
    for seed in (0, 0, 1):  # the same content twice, then another
        save_item_content(ITEM_CONTENT, {"text": _content(n_items=20, width=4, seed=seed)}, {"n_items": "20"})
        _, result = train_id_model("sasrec-text", params, train, histories, targets, 20, seed=0, state_dir=tmp_path / "state")
        runs.append(result.resumed)
    assert runs == [False, True, False]


def test_trains_over_a_content_file_named_by_the_caller(tmp_path, monkeypatch):
    """``build`` with ``from_params(content_path=...)``: the model reads that file, and the default one need not exist."""
    from functools import partial

    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "bench" / "item-content.safetensors"
    save_item_content(elsewhere, {"text": _content(n_items=20, width=4, seed=3)}, {"n_items": "20"})
    train, histories, targets = _next_item_data()
    params = SasrecContentParams(hidden_size=8, num_blocks=1, max_length=8, batch_size=16, epochs=1, patience=1)
    with pytest.raises(MissingInputError, match="item-content.safetensors: missing"):
        train_id_model("sasrec-text", params, train, histories, targets, 20, seed=0, state_dir=tmp_path / "s0")
    build = partial(SasrecText.from_params, content_path=elsewhere)
    model, _ = train_id_model("sasrec-text", params, train, histories, targets, 20, seed=0, state_dir=tmp_path / "s1", build=build)
    assert type(model) is SasrecText and torch.equal(model.content, read_item_content(elsewhere, ["text"], 20))
    assert not ITEM_CONTENT.exists()
