"""MIRM on the tiny preset: item prompts, [Cur_Item] embeddings, SFT encoding/loss, fine-tuning, catalog cache."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image

from molar.backbones import load_backbone
from molar.config import DEFAULT_PROMPTS, MirmParams
from molar.embed_cache import cached_catalog_embeddings, embed_catalog, load_catalog_embeddings
from molar.models.mirm import (
    IGNORE_INDEX,
    ItemText,
    PromptEncoder,
    ItemEmbedder,
    backbone_corpus,
    catalog_embedder,
    cur_item_states,
    embed_items,
    input_report,
    sft_loss,
    water_fill,
)
from molar.recipes.mirm import finetune
from molar.sft import IMAGE_MARKER

TEMPLATE = DEFAULT_PROMPTS["default"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is too small to gain from threads; on a shared 2-core box they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for name, size, colour in [("sq.png", (56, 56), "red"), ("wide.png", (84, 56), "blue"), ("big.png", (280, 280), "green")]:
        Image.new("RGB", size, colour).save(root / name)
    Image.new("RGB", (300, 450), "purple").save(root / "poster.jpg", quality=90)  # decoded in draft mode
    return root


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return load_backbone("tiny-qwen2-vl", corpus=["red shoe", "blue lamp"], modalities=["text", "image"],
                         cache_dir=cache, image_min_pixels=28 * 28, image_max_pixels=56 * 56)


def encoder(backbone, images, modalities=("text", "image"), max_text_tokens=96, **kw) -> PromptEncoder:
    return PromptEncoder(backbone, template=TEMPLATE, modalities=modalities, max_text_tokens=max_text_tokens,
                         image_root=images, **kw)


ITEMS = [
    ItemText("Red Shoe", "A red leather shoe for running.", "colour: red; category: shoe", "sq.png"),
    ItemText("Blue Lamp", "", "colour: blue", "wide.png"),
    ItemText("Green Mug", "A green mug. " * 12, "colour: green", None),
    ItemText("Gold Watch", "A gold watch.", "", "big.png"),
]


def test_water_fill():
    assert water_fill([3, 50, 10], 100) == [3, 50, 10]
    assert water_fill([3, 50, 10], 30) == [3, 17, 10]  # the longest field is cut first
    assert water_fill([40, 40], 30) == [15, 15]
    assert sum(water_fill([7, 9, 100, 1], 20)) <= 20


def test_item_prompt_layout(backbone, images):
    enc = encoder(backbone, images)
    s = backbone.special
    shoe, lamp, mug, watch = enc.encode_items(ITEMS)
    for e in (shoe, lamp, mug, watch):
        assert e.input_ids[-1] == s.cur_item and e.input_ids.count(s.cur_item) == 1
    # {image} -> vision_start + n pads + vision_end; n from the resized image (merge 2x2)
    assert shoe.input_ids[:6] == [s.vision_start, s.image, s.image, s.image, s.image, s.vision_end]
    assert (shoe.image_tokens, lamp.image_tokens, watch.image_tokens) == ([4], [2], [4])  # 84x56 -> 28x56
    assert mug.images == [] and s.image not in mug.input_ids
    text = backbone.tokenizer.decode(shoe.input_ids[6:])
    assert text == ("\nTitle: Red Shoe\nDescription: A red leather shoe for running.\n"
                    "Attributes: colour: red; category: shoe\n[Cur_Item]")
    # empty fields drop their whole line
    assert "Description" not in backbone.tokenizer.decode(lamp.input_ids)
    assert "Attributes" not in backbone.tokenizer.decode(watch.input_ids)


def test_images_are_resized_to_the_pixel_budget(backbone, images):
    enc = encoder(backbone, images)
    img = enc.load_image("poster.jpg")  # 300x450 -> 28x56 within 56*56 pixels (aspect kept, multiples of 28)
    assert img.size == (28, 56) and img.mode == "RGB"
    assert enc.image_token_count("poster.jpg") == 2
    batch = enc.collate(enc.encode_items([ItemText("Poster", "", "", "poster.jpg")]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 2]] and batch["pixel_values"].shape[0] == 8


def test_truncation_cuts_text_never_the_image(backbone, images):
    long = ItemText("Red Shoe", "very long text " * 50, "colour: red", "sq.png")
    full = encoder(backbone, images, max_text_tokens=10_000).encode_items([long])[0]
    cut = encoder(backbone, images, max_text_tokens=30).encode_items([long])[0]
    tok = backbone.tokenizer
    fields = sum(len(tok(v, add_special_tokens=False)["input_ids"]) for v in ("Red Shoe", "colour: red"))
    assert len(full) - len(cut) == len(tok("very long text " * 50, add_special_tokens=False)["input_ids"]) - (30 - fields)
    assert cut.image_tokens == [4] and cut.input_ids.count(backbone.special.image) == 4
    assert "Title: Red Shoe" in tok.decode(cut.input_ids) and "colour: red" in tok.decode(cut.input_ids)


def test_modalities(backbone, images):
    s = backbone.special
    text_only = encoder(backbone, images, modalities=["text"]).encode_items(ITEMS)
    assert all(s.image not in e.input_ids and s.vision_start not in e.input_ids for e in text_only)
    image_only = encoder(backbone, images, modalities=["image"]).encode_items(ITEMS)
    tok = backbone.tokenizer
    assert tok.decode(image_only[0].input_ids[6:]) == "\n[Cur_Item]"  # image line only
    assert "Title: Green Mug" in tok.decode(image_only[2].input_ids)  # no image: the title stands in
    assert "Description" not in tok.decode(image_only[2].input_ids)


@pytest.mark.parametrize("pad_side", ["right", "left"])
def test_cur_item_position_and_padding_independence(backbone, images, pad_side):
    enc = encoder(backbone, images)
    encoded = enc.encode_items(ITEMS)
    batch = enc.collate(encoded, pad_side=pad_side)
    ids = batch["input_ids"]
    assert (ids[torch.arange(len(ITEMS)), batch["cur_positions"]] == backbone.special.cur_item).all()
    assert int(batch["mm_token_type_ids"].sum()) == 4 + 2 + 4
    with torch.no_grad():
        together = cur_item_states(backbone.model, batch)
        alone = torch.cat([cur_item_states(backbone.model, enc.collate([e])) for e in encoded])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)
    # a text-only batch takes the explicit-position path
    text = encoder(backbone, images, modalities=["text"])
    tb = text.collate(text.encode_items(ITEMS), pad_side=pad_side)
    assert "position_ids" in tb and "pixel_values" not in tb
    with torch.no_grad():
        together = cur_item_states(backbone.model, tb)
        alone = torch.cat([cur_item_states(backbone.model, text.collate([e])) for e in text.encode_items(ITEMS)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-4)


def test_embed_items_keeps_input_order(backbone, images):
    enc = encoder(backbone, images)
    table = embed_items(backbone, enc, ITEMS, batch_size=3)
    assert table.shape == (4, backbone.hidden_size) and table.dtype == torch.float32
    with torch.no_grad():
        for i, item in enumerate(ITEMS):
            one = cur_item_states(backbone.model, enc.collate(enc.encode_items([item])))[0]
            torch.testing.assert_close(table[i], one, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(table[0], table[1])


def test_catalog_embedder_embeds_items_by_their_index(backbone, images):
    # item_idx i is the catalog's row i - 1; what comes back is MIRM (with gradients) on those prompts, in the asked order
    enc = encoder(backbone, images)
    items = pl.DataFrame({
        "item_idx": [1, 2, 3, 4],
        "title": [t.title for t in ITEMS], "description": [t.description for t in ITEMS],
        "attributes": ['{"colour": "red"}', '{"colour": "blue"}', None, '{"colour": "gold"}'],
        "image_path": [t.image_path for t in ITEMS],
    })
    embed = catalog_embedder(enc, items)
    module = ItemEmbedder(backbone.model)
    got = embed(module, torch.tensor([4, 1]))
    assert got.shape == (2, backbone.hidden_size) and got.requires_grad
    gold_watch = ItemText("Gold Watch", "A gold watch.", "colour: gold", "big.png")
    with torch.no_grad():
        want = cur_item_states(backbone.model, enc.collate(enc.encode_items([gold_watch, dataclasses.replace(ITEMS[0], attributes="colour: red")])))
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-4)


def test_sft_labels_mask_prompt_and_images(backbone, images):
    enc = encoder(backbone, images)
    e = enc.encode_sft(f"1. {IMAGE_MARKER} Red Shoe\n2. {IMAGE_MARKER} Blue Lamp\nNext?", ["sq.png", "wide.png"], "Gold Watch")
    s = backbone.special
    labelled = [i for i, y in enumerate(e.labels) if y != IGNORE_INDEX]
    answer = backbone.tokenizer("Gold Watch", add_special_tokens=False)["input_ids"] + [backbone.tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert [e.input_ids[i] for i in labelled] == answer == [e.labels[i] for i in labelled]
    assert labelled == list(range(len(e) - len(answer), len(e)))  # one contiguous answer at the end
    assert all(e.labels[i] == IGNORE_INDEX for i, t in enumerate(e.input_ids) if t in (s.image, s.vision_start, s.vision_end))
    assert e.input_ids.count(s.image) == 4 + 2 and e.image_tokens == [4, 2]
    assert backbone.tokenizer.decode(e.input_ids).startswith("<|im_start|>user\n1. <|vision_start|>")
    with pytest.raises(ValueError, match="markers"):
        enc.encode_sft(f"{IMAGE_MARKER}", [], "x")
    # text-only modality drops the markers and the images
    t = encoder(backbone, images, modalities=["text"]).encode_sft(f"{IMAGE_MARKER} Red Shoe", ["sq.png"], "x")
    assert s.image not in t.input_ids and t.images == []


def test_sft_truncation_keeps_images_and_answer(backbone, images):
    enc = encoder(backbone, images, sft_max_tokens=40, max_text_tokens=8)
    e = enc.encode_sft(f"{IMAGE_MARKER} " + "word " * 100, ["sq.png"], "a b c d e f g h i j k l m n")
    assert len(e) <= 40
    assert e.input_ids.count(backbone.special.image) == 4
    assert sum(y != IGNORE_INDEX for y in e.labels) == 8 + 1  # answer cut to max_text_tokens, + <|im_end|>


def test_sft_loss_equals_full_logits_cross_entropy(backbone, images):
    enc = encoder(backbone, images)
    batch = enc.collate([enc.encode_sft(f"{IMAGE_MARKER} Red Shoe. Next?", ["sq.png"], "Blue Lamp"),
                         enc.encode_sft("Describe: Blue Lamp", [], "A blue lamp made of glass.")])
    with torch.no_grad():
        ours = sft_loss(backbone.model, batch)
        inputs = {k: v for k, v in batch.items() if k not in ("cur_positions", "labels")}
        logits = backbone.model(**inputs, use_cache=False).logits
        reference = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(ours, reference)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_moves_the_loss_down(backbone, images, tmp_path, mode):
    examples = pl.DataFrame(
        {
            "task": ["IT", "SA", "UB", "SA"],
            "prompt": [f"{IMAGE_MARKER}\nDescribe.", "Title: Red Shoe\nDescribe.", f"1. {IMAGE_MARKER} Red Shoe\nNext?", "Title: Blue Lamp"],
            "image_paths": [["sq.png"], [], ["wide.png"], []],
            "target": ["Red Shoe. A red shoe.", "A red shoe for running.", "Blue Lamp", "A blue lamp."],
        }
    )
    # a private copy: fine-tuning replaces backbone.model
    work = dataclasses.replace(backbone, model=load_backbone(backbone.directory, modalities=["text", "image"]).model)
    enc = encoder(work, images)
    batch = enc.collate([enc.encode_sft(r["prompt"], r["image_paths"], r["target"]) for r in examples.iter_rows(named=True)])
    with torch.no_grad():
        before = float(sft_loss(work.model, batch))
    params = MirmParams(finetune=mode, lr=1e-2, epochs=6, batch_size=4, warmup_ratio=0.0, lora_dropout=0.0)
    result = finetune(work, enc, examples, params, seed=0, state_dir=tmp_path / "state", run_key=mode)
    assert result.steps == 6
    assert not hasattr(work.model, "peft_config")  # LoRA merged back: a plain transformers model
    with torch.no_grad():
        after = float(sft_loss(work.model, batch))
    # Random-init weights: LoRA leaves the (tiny) embeddings and final norm frozen, which caps how
    # large its logits can grow, so it moves the loss less than a full fine-tune does.
    assert after < before - {"full": 0.5, "lora": 0.2}[mode], (before, after)
    frozen = backbone.model.get_input_embeddings().weight
    if mode == "lora":  # only the adapters trained: the embeddings (outside LoRA targets) are unchanged
        torch.testing.assert_close(work.model.get_input_embeddings().weight, frozen)
    else:
        assert not torch.allclose(work.model.get_input_embeddings().weight, frozen)


def items_table(rows: list[ItemText]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "item_idx": list(range(1, len(rows) + 1)),
            "item_id": [f"i{i}" for i in range(len(rows))],
            "title": [r.title for r in rows],
            "description": [r.description for r in rows],
            "attributes": [json.dumps(dict(p.split(": ") for p in r.attributes.split("; ") if p)) for r in rows],
            "image_path": [r.image_path for r in rows],
        }
    )


def test_catalog_cache(backbone, images, tmp_path, monkeypatch):
    enc = encoder(backbone, images)
    items = items_table(ITEMS)
    table = embed_catalog(backbone, enc, items, batch_size=2)
    assert table.shape == (5, backbone.hidden_size)
    assert (table[0] == 0).all()
    torch.testing.assert_close(table[1:], embed_items(backbone, enc, ITEMS, batch_size=4), atol=1e-5, rtol=1e-4)

    path = tmp_path / "items.safetensors"
    first = cached_catalog_embeddings(path, backbone, enc, items, 2, "float32")
    torch.testing.assert_close(first, table, atol=1e-5, rtol=1e-4)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed although the cache matches")

    monkeypatch.setattr("molar.embed_cache.embed_catalog", fail)
    torch.testing.assert_close(cached_catalog_embeddings(path, backbone, enc, items, 2, "float32"), first)
    # another prompt (or checkpoint, or items table) is another key: recomputed, not reused
    with pytest.raises(AssertionError, match="recomputed"):
        cached_catalog_embeddings(path, backbone, encoder(backbone, images, modalities=["text"]), items, 2, "float32")
    assert load_catalog_embeddings(path, key="something else") is None


def stage_fixture(root: Path, images: Path, params: str) -> list[ItemText]:
    """A repository root with data/processed/items.parquet, images, data/sft/sft.parquet and params.yaml."""
    (root / "img").mkdir()
    for name in ("sq.png", "wide.png", "big.png"):
        (root / "img" / name).write_bytes((images / name).read_bytes())
    rows = [dataclasses.replace(r, image_path=r.image_path and f"img/{r.image_path}") for r in ITEMS]
    (root / "data/processed").mkdir(parents=True)
    items_table(rows).write_parquet(root / "data/processed/items.parquet")
    (root / "data/sft").mkdir()
    pl.DataFrame(
        {"task": ["IT", "SA", "UB"], "prompt": [f"{IMAGE_MARKER}\nDescribe.", "Title: Blue Lamp\nDescribe.", f"1. {IMAGE_MARKER} Red Shoe\nNext?"],
         "image_paths": [["img/sq.png"], [], ["img/wide.png"]], "target": ["A red shoe.", "A blue lamp.", "Blue Lamp"]}
    ).write_parquet(root / "data/sft/sft.parquet")
    (root / "params.yaml").write_text(params)
    return rows


def test_train_mirm_stage(tmp_path, monkeypatch, images):
    """The stage end to end: SFT data -> fine-tune -> checkpoint dir + catalog cache; rerun resumes."""
    from stages.train_mirm import ITEM_EMBEDDINGS, MIRM_DIR, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOLAR_CACHE", str(tmp_path / "cache"))
    rows = stage_fixture(tmp_path, images, "mirm:\n  finetune: lora\n  epochs: 2\n  batch_size: 2\n  lr: 1.0e-2\n")

    main(Path("params.yaml"))
    saved = load_backbone(MIRM_DIR, modalities=["text", "image"])
    assert type(saved.model).__name__ == "Qwen2VLForConditionalGeneration"
    card = json.loads((MIRM_DIR / "molar_mirm.json").read_text())
    assert card["finetune"] == "lora" and card["lora"] == "merged into the weights"
    table = load_catalog_embeddings(ITEM_EMBEDDINGS)
    assert table.shape == (5, saved.hidden_size) and (table[0] == 0).all() and table[1:].abs().sum(1).gt(0).all()
    metrics = json.loads(Path("metrics/mirm.json").read_text())
    assert metrics["steps"] == 4 and metrics["n_items"] == 4 and not metrics["resumed"]
    weights = (MIRM_DIR / "model.safetensors").read_bytes()

    main(Path("params.yaml"))  # finished run: resumed from data/state, same weights, same table
    assert json.loads(Path("metrics/mirm.json").read_text())["resumed"]
    assert (MIRM_DIR / "model.safetensors").read_bytes() == weights
    torch.testing.assert_close(load_catalog_embeddings(ITEM_EMBEDDINGS), table)

    Path("params.yaml").write_text("mirm:\n  finetune: none\n  modalities: [text]\n")
    main(Path("params.yaml"))  # none: the base checkpoint (+ [Cur_Item]/[User]) is passed on, not trained
    assert json.loads((MIRM_DIR / "molar_mirm.json").read_text())["finetune"] == "none"
    base = load_backbone("tiny-qwen2-vl", corpus=backbone_corpus(items_table(rows)))
    for a, b in zip(base.model.state_dict().values(), load_backbone(MIRM_DIR).model.state_dict().values()):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_train_mirm_stage_two_processes(tmp_path, images):
    """Under torchrun (2 CPU processes, gloo): data-parallel fine-tuning, then a sharded catalog
    embedding that equals the single-process one."""
    import os
    import subprocess
    import sys

    stage_fixture(tmp_path, images, "mirm:\n  finetune: full\n  epochs: 1\n  batch_size: 1\n")
    script = tmp_path / "run_stage.py"
    script.write_text("from pathlib import Path\nfrom stages.train_mirm import main\nmain(Path('params.yaml'))\n")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MOLAR_CACHE": str(tmp_path / "cache"), "ACCELERATE_USE_CPU": "1",
           "PYTHONPATH": os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    done = subprocess.run([*torchrun, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/mirm.json").read_text())
    assert metrics["steps"] == 2  # 3 examples, batch 1, 2 processes: ceil(3 / 2) steps each
    sharded = load_catalog_embeddings(tmp_path / "data/models/mirm-items.safetensors")
    saved = load_backbone(tmp_path / "data/models/mirm", modalities=["text", "image"])
    enc = PromptEncoder(saved, template=TEMPLATE, modalities=["text", "image"], max_text_tokens=96, image_root=tmp_path)
    items = pl.read_parquet(tmp_path / "data/processed/items.parquet")
    torch.testing.assert_close(sharded, embed_catalog(saved, enc, items, batch_size=32), atol=1e-5, rtol=1e-4)


def test_input_report_counts_modalities_and_warns_where_input_cannot_help():
    items = items_table([ItemText("Heat", "", "", "/img/1.png"), ItemText("Alien", "a film", "Genre: scifi", None)])
    clean = input_report(items, "tiny-qwen2-vl", ["text", "image"], "synthetic")
    assert clean == {"items_with_image": 1, "items_with_text": 2, "missing_modalities": [], "warnings": []}

    # the random preset on real data is named, with the pretrained presets to use instead
    real = input_report(items, "tiny-qwen2-vl", ["text"], "movielens")
    assert len(real["warnings"]) == 1 and "smollm2-135m" in real["warnings"][0]
    assert input_report(items, "smollm2-135m", ["text"], "movielens")["warnings"] == []

    # images asked for where no item has one (ml-100k): reported, not silently dropped
    no_images = items_table([ItemText("Heat", "", "", None), ItemText("Alien", "", "", None)])
    report = input_report(no_images, "/models/qwen2-vl", ["text", "image"], "recbole")
    assert report["items_with_image"] == 0 and report["missing_modalities"] == ["image"]
    assert report["warnings"] == [
        "mirm.modalities asks for image, but none of the 2 items has an image; "
        "drop it from mirm.modalities (it adds nothing to the prompts)"
    ]
