"""DUEG: every prefix's [User] state in one pass equals the single-[User] pass on that prefix."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, LlamaConfig, Qwen2VLTextConfig

from molar.models.dueg import Dueg, ItemWhitening, decoder_of, item_adapter_for, prefix_user_layout


def tiny_decoder(kind: str, attn: str = "sdpa", hidden: int = 32, seed: int = 0):
    """A random 2-layer decoder of the two families DUEG runs on (Qwen2-VL text model, Llama/SmolLM2)."""
    common = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=11, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    if kind == "qwen2vl":
        # M-RoPE sections must sum to head_dim / 2 = 32 / 4 / 2 = 4
        config = Qwen2VLTextConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    else:
        config = LlamaConfig(**common)
    torch.manual_seed(seed)
    return AutoModel.from_config(config, attn_implementation=attn).eval()


def left_padded(lengths: list[int], width: int) -> torch.Tensor:
    real = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        real[row, width - n :] = True
    return real


@pytest.mark.parametrize("kind", ["qwen2vl", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_all_prefix_users_equal_separate_single_user_passes(kind: str, attn: str) -> None:
    dueg = Dueg(tiny_decoder(kind, attn), item_dim=32).eval()
    torch.manual_seed(1)
    width, lengths = 5, [5, 3, 1]
    items = torch.randn(len(lengths), width, 32)
    real = left_padded(lengths, width)
    with torch.no_grad():
        every = dueg(items, real, torch.arange(width))  # [B, L, d]
        for row, n in enumerate(lengths):
            for t in range(1, n + 1):
                col = width - n + t - 1
                prefix = items[row : row + 1, width - n : col + 1]  # the first t real items, no padding
                alone = dueg(prefix, torch.ones(1, t, dtype=torch.bool), torch.tensor([t - 1]))
                torch.testing.assert_close(every[row, col], alone[0, 0], atol=1e-5, rtol=1e-5)


def test_padding_and_batch_company_do_not_change_a_user_vector() -> None:
    dueg = Dueg(tiny_decoder("qwen2vl"), item_dim=32).eval()
    torch.manual_seed(2)
    history = torch.randn(1, 4, 32)
    with torch.no_grad():
        alone = dueg(history, torch.ones(1, 4, dtype=torch.bool), torch.tensor([3]))[0, 0]
        padded = torch.cat([torch.randn(1, 3, 32), history], dim=1)  # junk in the padding columns
        other = torch.randn(1, 7, 32)
        batch = torch.cat([padded, other])
        real = torch.cat([left_padded([4], 7), torch.ones(1, 7, dtype=torch.bool)])
        in_batch = dueg(batch, real, torch.tensor([6]))[0, 0]
    torch.testing.assert_close(in_batch, alone, atol=1e-5, rtol=1e-5)


def test_user_vector_depends_on_order_and_on_the_user_token() -> None:
    dueg = Dueg(tiny_decoder("llama"), item_dim=32).eval()
    torch.manual_seed(3)
    h = torch.randn(1, 4, 32)
    ones, last = torch.ones(1, 4, dtype=torch.bool), torch.tensor([3])
    with torch.no_grad():
        a = dueg(h, ones, last)
        b = dueg(h.flip(1), ones, last)
        dueg.user_token.add_(1.0)
        c = dueg(h, ones, last)
    assert not torch.allclose(a, b, atol=1e-4), "a causal decoder with positions must see the order"
    assert not torch.allclose(a, c, atol=1e-4), "the [User] embedding must matter"


def test_layout_masks_and_positions_by_hand() -> None:
    # one row, columns [pad, i1, i2]; Users after columns 1 and 2
    real = torch.tensor([[False, True, True]])
    allowed, positions = prefix_user_layout(real, torch.tensor([1, 2]))
    # tokens: 0 pad, 1 i1, 2 i2, 3 U(after i1), 4 U(after i2)
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0],  # padding sees itself only
            [0, 1, 0, 0, 0],  # i1
            [0, 1, 1, 0, 0],  # i2 sees i1, i2, never a User
            [0, 1, 0, 1, 0],  # U1 sees i1 and itself
            [0, 1, 1, 0, 1],  # U2 sees i1, i2 and itself
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed[0], expected)
    assert positions.tolist() == [[0, 0, 1, 1, 2]]  # U after t items sits at position t


def test_no_word_embeddings_and_projection_when_widths_differ() -> None:
    decoder = tiny_decoder("qwen2vl")
    dueg = Dueg(decoder, item_dim=16)
    assert decoder.get_input_embeddings().weight.shape == (1, 32) and decoder.config.vocab_size == 1
    assert isinstance(dueg.item_proj, torch.nn.Linear) and dueg.item_proj.in_features == 16
    assert isinstance(Dueg(tiny_decoder("llama"), item_dim=32).item_proj, torch.nn.Identity)
    out = dueg(dueg.project_items(torch.randn(2, 3, 16)), torch.ones(2, 3, dtype=torch.bool), torch.arange(3))
    assert out.shape == (2, 3, 32)


def test_rejects_attention_without_4d_masks_and_finds_decoders() -> None:
    decoder = tiny_decoder("llama")
    decoder.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa or eager"):
        Dueg(decoder, item_dim=32)
    from transformers import LlamaForCausalLM

    lm = LlamaForCausalLM(tiny_decoder("llama").config)
    assert decoder_of(lm) is lm.model


def test_whitening_gives_identity_covariance_at_the_token_scale() -> None:
    # three items on a line in 2-D: the long axis has 100x the variance of the short one
    catalog = torch.tensor([[10.0, 1.0], [0.0, 0.0], [-10.0, -1.0], [0.0, 0.5], [0.0, -0.5]])
    w = ItemWhitening(2, catalog, scale=0.02)
    out = w(catalog)
    assert torch.allclose(out.mean(0), torch.zeros(2), atol=1e-6)
    cov = out.T @ out / (catalog.shape[0] - 1)
    assert torch.allclose(cov, 0.02**2 * torch.eye(2), atol=1e-7), cov
    # fewer items than dimensions: the null direction is floored, not divided by zero
    flat = torch.tensor([[1.0, 0.0, 3.0], [2.0, 0.0, 3.0]])
    assert torch.isfinite(ItemWhitening(3, flat)(flat)).all()
    # no catalog (a checkpoint is about to be loaded): scale times the identity
    assert torch.equal(ItemWhitening(2, None, scale=2.0)(torch.ones(1, 2)), torch.full((1, 2), 2.0))


def test_whiten_adapter_is_fixed_statistics_then_a_learned_identity() -> None:
    catalog = torch.randn(50, 8) * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 0.1]) + 5.0
    adapter = item_adapter_for(8, 8, "whiten", catalog, input_scale=0.5)
    trainable = {name for name, p in adapter.named_parameters()}
    assert trainable == {"1.weight", "1.bias"}  # the whitening is buffers, saved but never trained
    assert set(adapter.state_dict()) == {"0.mean", "0.matrix", "1.weight", "1.bias"}
    out = adapter(catalog)
    assert torch.allclose(out.std(0), torch.full((8,), 0.5), rtol=1e-3)
    # the learned part starts as the identity, so the adapter equals the fixed whitening
    assert torch.allclose(out, adapter[0](catalog))


def test_dueg_whitening_uses_the_decoders_token_embedding_scale() -> None:
    decoder = tiny_decoder("llama")
    with torch.no_grad():
        decoder.get_input_embeddings().weight.fill_(0.25)
    catalog = torch.randn(40, 32)
    dueg = Dueg(decoder, 32, item_adapter="whiten", catalog=catalog)
    assert torch.allclose(dueg.project_items(catalog).std(0), torch.full((32,), 0.25), rtol=1e-3)


def test_item_adapter_trains_at_its_own_lr_and_the_rest_at_train_lr() -> None:
    from molar.config import TrainParams
    from molar.recipes.molar import param_groups

    class Stand(torch.nn.Module):  # what param_groups reads of a MolarModel
        def __init__(self) -> None:
            super().__init__()
            catalog = torch.randn(9, 16)
            self.items, self.item_ids = torch.nn.Identity(), None
            self.dueg = Dueg(tiny_decoder("llama"), item_dim=16, item_adapter="mlp", catalog=catalog)
            self.align_head = torch.nn.Linear(32, 8)

    model = Stand()
    rest, adapter = param_groups(model, TrainParams(lr=2e-4, item_adapter_lr_scale=10.0))
    assert {id(p) for p in adapter["params"]} == {id(p) for p in model.dueg.item_proj.parameters()}
    assert len(adapter["params"]) == 6  # the learned linear map and the MLP's up and down (weights, biases)
    assert adapter["lr"] == pytest.approx(2e-3)
    assert {id(p) for p in rest["params"]} == {id(p) for p in model.parameters()} - {id(p) for p in adapter["params"]}
    assert id(model.dueg.user_token) in {id(p) for p in rest["params"]} and "lr" not in rest
    assert param_groups(model, TrainParams(lr=2e-4, item_adapter_lr_scale=1.0)) is None
