"""The item-content stage on the tiny preset: text states of text-only prompts, the vision tower's image
features (molar/models/mirm.py:image_features), and the file the content SASRecs read."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from molar.backbones import load_backbone
from molar.config import MirmParams
from molar.embed_cache import item_content_tables
from molar.item_content import ITEM_CONTENT, read_item_content
from molar.models.mirm import image_features, image_states, item_texts, make_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

MIRM = MirmParams()


def _items(images: dict[int, str | None], titles: dict[int, str] | None = None) -> pl.DataFrame:
    """Four items: a title, a description, attributes, and the image of ``images`` (None: no image)."""
    titles = titles or {}
    return pl.DataFrame(
        {
            "item_idx": [1, 2, 3, 4],
            "item_id": ["a", "b", "c", "d"],
            "title": [titles.get(i, t) for i, t in enumerate(["Red Shoe", "Blue Lamp", "Green Mug", "Gold Watch"], 1)],
            "description": ["A red shoe.", "", "A green mug.", "A gold watch."],
            "attributes": [json.dumps({"colour": c}) for c in ("red", "blue", "green", "gold")],
            "image_path": [images.get(i) for i in range(1, 5)],
        }
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A folder with four images; item paths are relative to it (tests chdir there)."""
    root = tmp_path_factory.mktemp("root")
    (root / "img").mkdir()
    for name, size, colour in [("red.png", (56, 56), "red"), ("blue.png", (84, 56), "blue"), ("gold.png", (56, 56), "gold")]:
        Image.new("RGB", size, colour).save(root / "img" / name)
    Image.new("RGB", (56, 56), "red").save(root / "img" / "red-copy.png")
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_backbone(
        "tiny-qwen2-vl", corpus=["red shoe", "blue lamp"], modalities=["text", "image"],
        cache_dir=tmp_path_factory.mktemp("cache"), image_min_pixels=MIRM.image_min_pixels, image_max_pixels=MIRM.image_max_pixels,
    )


IMAGES = {1: "img/red.png", 2: "img/blue.png", 3: None, 4: "img/gold.png"}


def test_image_states_are_the_vision_towers_pooled_output_and_zero_without_an_image(backbone, root, monkeypatch):
    monkeypatch.chdir(root)
    encoder = make_encoder(backbone, MIRM.model_copy(update={"modalities": ["image"]}), "synthetic")
    texts = item_texts(_items(IMAGES))
    batch = encoder.collate(encoder.encode_items(texts))
    with torch.no_grad():
        states = image_states(backbone.model, batch)
        merged = backbone.model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
    assert states.shape == (4, backbone.hidden_size)
    assert torch.all(states[2] == 0) and states[[0, 1, 3]].abs().sum(1).gt(0).all()  # item 3 has no image
    tokens = (batch["image_grid_thw"].prod(-1) // backbone.merge_size**2).tolist()  # 56x56 -> 4, 84x56 -> 2
    assert tokens == [4, 2, 4]
    assert torch.allclose(states[0], merged[:4].mean(0), atol=1e-6) and torch.allclose(states[1], merged[4:6].mean(0), atol=1e-6)
    with torch.no_grad():  # an image's features do not depend on its batch mates
        alone = image_features(backbone.model, encoder.collate(encoder.encode_items(texts[1:2])))
    assert torch.allclose(alone[0], states[1], atol=1e-5)


def test_each_table_reads_only_its_modality(backbone, root, monkeypatch):
    monkeypatch.chdir(root)
    tables, why = item_content_tables(backbone, MIRM, "synthetic", _items(IMAGES))
    assert why is None and set(tables) == {"text", "image"}
    assert all(t.shape == (5, backbone.hidden_size) and torch.all(t[0] == 0) for t in tables.values())
    assert torch.all(tables["image"][3] == 0) and tables["text"][3].abs().sum() > 0  # item 3: text, no image
    # another image of the same look, another title: the text table follows the text only, the image table the image only
    changed, _ = item_content_tables(backbone, MIRM, "synthetic", _items({**IMAGES, 1: "img/red-copy.png", 2: "img/gold.png"}, {4: "Silver Watch"}))
    assert torch.allclose(changed["text"][:4], tables["text"][:4], atol=1e-5) and not torch.allclose(changed["text"][4], tables["text"][4])
    assert torch.allclose(changed["image"][1], tables["image"][1], atol=1e-6)  # identical pixels
    assert torch.allclose(changed["image"][2], tables["image"][4], atol=1e-6) and torch.allclose(changed["image"][4], tables["image"][4])

    none, why = item_content_tables(backbone, MIRM, "synthetic", _items({}))
    assert set(none) == {"text"} and why == "no item has an image"


def test_item_content_stage(backbone, root, tmp_path, monkeypatch):
    """data/processed + data/models/mirm -> data/models/item-content.safetensors (byte-reproducible) + metrics."""
    from stages.item_content import RECORD, main
    from stages.train_mirm import MIRM_DIR

    monkeypatch.chdir(tmp_path)
    (tmp_path / "img").symlink_to(root / "img")
    (tmp_path / "data/processed").mkdir(parents=True)
    _items(IMAGES).write_parquet(tmp_path / "data/processed/items.parquet")
    backbone.save(MIRM_DIR)
    (tmp_path / "params.yaml").write_text("seed: 1\n")

    main(Path("params.yaml"))
    with safe_open(str(ITEM_CONTENT), framework="pt") as f:
        assert sorted(f.keys()) == ["image", "text"] and f.metadata()["n_items"] == "4"
    both = read_item_content(ITEM_CONTENT, ["text", "image"], 4)
    assert both.shape == (5, 2 * backbone.hidden_size) and torch.all(both[0] == 0)
    record = json.loads(RECORD.read_text())
    assert (record["items_with_image"], record["items_without_image"], record["why_no_image"]) == (3, 1, None)
    assert record["widths"] == {"text": backbone.hidden_size, "image": backbone.hidden_size}
    first = ITEM_CONTENT.read_bytes()
    main(Path("params.yaml"))
    assert ITEM_CONTENT.read_bytes() == first
