"""DuoRec: a SASRec with RecBole's contrastive regulariser, and the same-target partners the recipe builds for it."""

import json
import math

import numpy as np
import pytest
import torch

from molar.config import DuorecParams
from molar.losses import in_batch_info_nce
from molar.models.duorec import DuoRec, DuorecConfig
from molar.models.id_model import NextItemBatch, SequentialRecommender
from molar.models.sasrec import SASRec
from molar.recipes.id_models import NextItemBatches, load_scorer, train_id_model
from successor_data import successor_sequences  # tests/successor_data.py

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _model(contrast="us_x", seed=0, **kw) -> DuoRec:
    torch.manual_seed(seed)
    config = {"n_items": 12, "hidden_size": 8, "num_blocks": 2, "num_heads": 2, "dropout": 0.2, "max_length": 6}
    config |= {"contrast": contrast, "lambda_": 0.1, "tau": 1.0, "similarity": "dot"} | kw
    return DuoRec(DuorecConfig(**config)).eval()


# ------------------------------------------------------------------------------ the model
def test_shapes_and_the_padding_row():
    model = _model()
    assert isinstance(model, SequentialRecommender) and isinstance(model, SASRec)
    assert model.encode(torch.tensor([[0, 1, 2], [3, 4, 5]])).shape == (2, 3, 8)
    assert model.item_embeddings().shape == (13, 8) and torch.all(model.item_embeddings()[0] == 0)
    assert model.score([[1, 2], [3], []]).shape == (3, 13)


def test_padding_never_changes_a_user_vector():
    model = _model()
    history = [3, 4, 5]
    unpadded = model.encode(torch.tensor([history]))
    for pad in (1, 3):
        padded = model.encode(torch.tensor([[0] * pad + history]))
        assert torch.allclose(padded[:, pad:], unpadded, atol=1e-6)  # every real position
    with_mate = model.user_vectors([history, [1, 2, 3, 4, 5, 6]])[:1]  # more padding in a batch
    assert torch.allclose(with_mate, unpadded[:, -1], atol=1e-6)


def test_from_params_takes_the_section_with_recboles_defaults():
    section = DuorecParams()
    model = DuoRec.from_params(30, section)
    assert model.config == DuorecConfig(
        n_items=30, hidden_size=64, num_blocks=2, num_heads=2, dropout=0.2, max_length=50,
        contrast="us_x", lambda_=0.1, tau=1.0, similarity="dot",
    )
    assert model.same_target_partners  # us_x contrasts with a same-target partner
    assert DuoRec.from_params(30, section.model_copy(update={"contrast": "su"})).same_target_partners
    assert not DuoRec.from_params(30, section.model_copy(update={"contrast": "un"})).same_target_partners


def test_heads_that_do_not_divide_the_width_name_the_duorec_section():
    with pytest.raises(ValueError, match=r"duorec\.hidden_size \(8\) must be divisible by duorec\.num_heads \(3\)"):
        _model(num_heads=3)


def test_save_and_load_round_trip(tmp_path):
    model = _model(contrast="su", similarity="cosine", lambda_=0.3, tau=0.5)
    model.save_pretrained(tmp_path / "duorec")
    config = json.loads((tmp_path / "duorec" / "config.json").read_text())
    assert config["model"] == "duorec" and (config["contrast"], config["lambda_"], config["tau"], config["similarity"]) == ("su", 0.3, 0.5, "cosine")
    loaded = DuoRec.from_pretrained(tmp_path / "duorec")
    assert loaded.config == model.config and not loaded.training
    assert torch.equal(loaded.score([[1, 2, 3], [4]]), model.score([[1, 2, 3], [4]]))


# ---------------------------------------------------------------------- the contrastive loss
def test_info_nce_by_hand_dot():
    """2 sequences, 2-d views: a1=(1,0), a2=(0,1), b1=(1,1), b2=(0,2); tau 0.5.

    z = [a1, a2, b1, b2]; row i's positive is its pair, every other row but itself a negative.
    a1: a1.a2=0, a1.b1=1 (positive), a1.b2=0 -> /tau: 0, 2, 0
    a2: a2.a1=0, a2.b1=1, a2.b2=2 (positive)  -> 0, 2, 4
    b1: b1.a1=1 (positive), b1.a2=1, b1.b2=2  -> 2, 2, 4
    b2: b2.a1=0, b2.a2=2 (positive), b2.b1=2  -> 0, 4, 4
    """
    e = math.exp
    rows = [
        -math.log(e(2) / (e(0) + e(2) + e(0))),
        -math.log(e(4) / (e(0) + e(2) + e(4))),
        -math.log(e(2) / (e(2) + e(2) + e(4))),
        -math.log(e(4) / (e(0) + e(4) + e(4))),
    ]
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert in_batch_info_nce(a, b, tau=0.5, similarity="dot").item() == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_info_nce_by_hand_cosine():
    """The same views as unit vectors: b1 = (1,1)/sqrt2, b2 = (0,1); tau 1.

    a1: cos(a1,a2)=0, cos(a1,b1)=c (positive), cos(a1,b2)=0      with c = 1/sqrt2
    a2: cos(a2,a1)=0, cos(a2,b1)=c, cos(a2,b2)=1 (positive)
    b1: cos(b1,a1)=c (positive), cos(b1,a2)=c, cos(b1,b2)=c
    b2: cos(b2,a1)=0, cos(b2,a2)=1 (positive), cos(b2,b1)=c
    """
    e, c = math.exp, 1 / math.sqrt(2)
    rows = [
        -math.log(e(c) / (e(0) + e(c) + e(0))),
        -math.log(e(1) / (e(0) + e(c) + e(1))),
        -math.log(e(c) / (e(c) + e(c) + e(c))),
        -math.log(e(1) / (e(0) + e(1) + e(c))),
    ]
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    assert in_batch_info_nce(a, b, tau=1.0, similarity="cosine").item() == pytest.approx(sum(rows) / 4, rel=1e-6)


def test_info_nce_rejects_mismatched_views_and_a_bad_temperature():
    with pytest.raises(ValueError, match="one shape"):
        in_batch_info_nce(torch.ones(2, 3), torch.ones(3, 3), tau=1.0)
    with pytest.raises(ValueError, match="tau must be > 0"):
        in_batch_info_nce(torch.ones(2, 3), torch.ones(2, 3), tau=0.0)


def _batch() -> NextItemBatch:
    inputs = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 0, 7]])
    targets = torch.tensor([[0, 2, 3], [4, 5, 6], [0, 0, 8]])
    partners = torch.tensor([[0, 9, 2], [0, 11, 5], [0, 6, 7]])
    return NextItemBatch(inputs, targets, partners)


@pytest.mark.parametrize("contrast", ["us_x", "un", "su"])
def test_auxiliary_loss_contrasts_the_views_its_contrast_names(contrast):
    """In eval mode (no dropout) every pass of an input is the same, so the views are known exactly;
    ``states`` (the next-item pass) is a stand-in, to see which views read it."""
    model = _model(contrast=contrast, lambda_=0.3, tau=0.7)
    batch = _batch()
    states = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(0))
    second, partner = model.encode(batch.inputs)[:, -1], model.encode(batch.partners)[:, -1]
    a, b = {"us_x": (second, partner), "un": (states[:, -1], second), "su": (states[:, -1], partner)}[contrast]
    term, logs = model.auxiliary_loss(batch, states)
    expected = in_batch_info_nce(a, b, tau=0.7)
    assert torch.allclose(term, 0.3 * expected) and logs == {"contrastive_loss": pytest.approx(expected.item())}


def test_views_of_one_input_differ_by_their_dropout_masks_in_training():
    model = _model(contrast="un").train()
    batch = _batch()
    torch.manual_seed(0)
    term, _ = model.auxiliary_loss(batch, model(batch.inputs))
    model.eval()
    same = model.encode(batch.inputs)
    still, _ = model.auxiliary_loss(batch, same)
    assert not torch.allclose(term, still)  # two dropout views are not one view twice


def test_a_partner_contrast_without_partners_is_an_error():
    batch = _batch()._replace(partners=None)
    with pytest.raises(ValueError, match="needs same-target partners"):
        _model(contrast="us_x").auxiliary_loss(batch, torch.zeros(3, 3, 8))


# -------------------------------------------------------------------- same-target partners
def _partner_sets(sequences, max_length, epochs=40):
    """{row's input: the set of partners drawn for it over ``epochs`` epochs}, from 1-row batches."""
    batches = NextItemBatches(sequences, max_length=max_length, batch_size=1, seed=0, partners=True)
    seen: dict[tuple, set] = {}
    for epoch in range(epochs):
        for inputs, targets, partners in batches(epoch):
            row = tuple(int(i) for i in inputs[0] if i)
            seen.setdefault(row, set()).add(tuple(int(i) for i in partners[0] if i))
    return seen


def test_partners_are_the_other_prefixes_followed_by_the_same_target():
    # last targets: 3, 3, 3, 7 and 5; prefixes followed by 3 are [1, 2], [4, 2], [5] and, inside
    # the last sequence, [9, 8]
    sequences = [[1, 2, 3], [4, 2, 3], [5, 3], [6, 7], [9, 8, 3, 5]]
    seen = _partner_sets(sequences, max_length=5)
    assert seen[(1, 2)] == {(4, 2), (5,), (9, 8)}  # never itself
    assert seen[(4, 2)] == {(1, 2), (5,), (9, 8)}
    assert seen[(5,)] == {(1, 2), (4, 2), (9, 8)}
    assert seen[(6,)] == {(6,)}  # no other sample is followed by 7: the row itself, as RecBole
    assert seen[(9, 8, 3)] == {(9, 8, 3)}  # 5 follows nothing else either


def test_partner_prefixes_are_cut_to_max_length():
    seen = _partner_sets([[1, 2, 3, 4, 5], [9, 5]], max_length=2)
    assert seen[(9,)] == {(3, 4)}  # [1, 2, 3, 4] -> 5, its last 2 items
    assert seen[(3, 4)] == {(9,)}


def test_partners_are_a_pure_function_of_seed_and_epoch_and_keep_the_order():
    rng = np.random.default_rng(0)
    sequences = successor_sequences(rng, 15, 60)
    with_partners = NextItemBatches(sequences, max_length=4, batch_size=8, seed=3, partners=True)
    without = NextItemBatches(sequences, max_length=4, batch_size=8, seed=3)
    assert len(with_partners) == len(without)
    for epoch in (0, 1):
        first, again = list(with_partners(epoch)), list(with_partners(epoch))
        assert all(torch.equal(x, y) for b1, b2 in zip(first, again) for x, y in zip(b1, b2))
        for (inputs, targets, partners), (plain_inputs, plain_targets) in zip(first, without(epoch)):
            assert torch.equal(inputs, plain_inputs) and torch.equal(targets, plain_targets)  # the same order
            assert partners.shape[0] == inputs.shape[0] and partners.shape[1] <= 4
            assert torch.all(partners[:, -1] != 0)  # a partner is never empty
            assert torch.equal(partners[:, -1] + 1, targets[:, -1])  # i is followed by i + 1: the same target
    changed = [torch.equal(a[2], b[2]) for a, b in zip(with_partners(0), with_partners(1))]
    assert not all(changed)  # another epoch, other draws


# ----------------------------------------------------------------------------- training
def test_learns_that_item_i_is_followed_by_i_plus_1(tmp_path):
    """Through the recipe (next-item CE + the us_x term on same-target partners): Recall@1 >= 0.95."""
    n_items = 20
    rng = np.random.default_rng(0)
    train = successor_sequences(rng, n_items, 200)
    valid, held_out = ([s[: int(rng.integers(1, len(s)))] for s in successor_sequences(rng, n_items, 100)] for _ in range(2))
    params = DuorecParams.model_validate(
        {"hidden_size": 16, "num_blocks": 1, "num_heads": 2, "dropout": 0.1, "max_length": 8, "lr": 1e-2, "batch_size": 32, "epochs": 12}
    )
    valid_targets = [p[-1] + 1 for p in valid]
    model, result = train_id_model("duorec", params, train, valid, valid_targets, n_items, seed=0, state_dir=tmp_path / "state")
    assert result.history[0]["contrastive_loss"] > 0  # the term was there
    with torch.no_grad():
        top1 = load_scorer(model)(held_out)[:, 1:].argmax(dim=1) + 1  # column 0 is padding
    assert (top1 == torch.tensor([p[-1] + 1 for p in held_out])).float().mean().item() >= 0.95


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """The partners are rebuilt from (seed, epoch) on resume: a run stopped mid-epoch and resumed
    ends where an uninterrupted one does (CPU, one thread: bit for bit)."""
    rng = np.random.default_rng(1)
    train = successor_sequences(rng, 15, 80)
    valid = [s[:-1] for s in train[:20]]
    params = DuorecParams.model_validate(
        {"hidden_size": 8, "num_blocks": 1, "num_heads": 1, "max_length": 5, "batch_size": 16, "epochs": 2, "checkpoint_every": 2}
    )
    args = ("duorec", params, train, valid, [s[-1] for s in train[:20]], 15)
    reference, _ = train_id_model(*args, seed=0, state_dir=tmp_path / "reference")

    calls, real = {"n": 0}, DuoRec.auxiliary_loss

    def stop_at_the_seventh_batch(self, batch, states):
        calls["n"] += 1
        if calls["n"] == 7:  # epoch 2 (5 batches an epoch), after its first checkpoint
            raise KeyboardInterrupt
        return real(self, batch, states)

    monkeypatch.setattr(DuoRec, "auxiliary_loss", stop_at_the_seventh_batch)
    with pytest.raises(KeyboardInterrupt):
        train_id_model(*args, seed=0, state_dir=tmp_path / "state")
    monkeypatch.setattr(DuoRec, "auxiliary_loss", real)
    resumed, result = train_id_model(*args, seed=0, state_dir=tmp_path / "state")
    assert result.resumed
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()))

