"""IT / SA / UB synthesis (molar/sft.py) and the sft-data stage, on hand-made fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import polars as pl
import pytest

from molar.sft import IMAGE_MARKER, SCHEMA, attribute_sentence, detailed_description, synthesize


def make_items() -> pl.DataFrame:
    """Six items; 3 has no image, 4 has no description and no attributes; 6 is only ever a test target."""
    rows = [
        (1, "Red Shoe", "A red shoe.", {"colour": "red", "category": "shoe"}, "img/1.png"),
        (2, "Blue Lamp", "A blue lamp.", {"colour": "blue", "category": "lamp"}, "img/2.png"),
        (3, "Green Mug", "A green mug.", {"colour": "green"}, None),
        (4, "Plain Box", "", {}, "img/4.png"),
        (5, "Gold Watch", "A gold watch.", {"material": "gold", "price": 99.5}, "img/5.png"),
        (6, "Secret Future Item", "Only in test.", {"colour": "violet"}, "img/6.png"),
    ]
    return pl.DataFrame(
        {
            "item_idx": [r[0] for r in rows],
            "item_id": [f"i{r[0]}" for r in rows],
            "title": [r[1] for r in rows],
            "description": [r[2] for r in rows],
            "attributes": [json.dumps(r[3]) for r in rows],
            "image_path": [r[4] for r in rows],
        }
    )


# Training sequences only: the leave-one-out split already removed valid/test items (6 is a test target).
TRAIN = [[1, 2, 3, 5], [2, 3], [5, 4, 1, 2, 3]]


def run(tasks=("IT", "SA", "UB"), n=12, seed=7, history=2, use_images=True):
    return synthesize(make_items(), TRAIN, tasks, n, seed, history, use_images)


def test_schema_counts_and_markers():
    table, report = run()
    assert dict(table.schema) == SCHEMA
    assert table.group_by("task").len().sort("task").rows() == [("IT", 12), ("SA", 12), ("UB", 12)]
    assert report["tasks"] == {"IT": 12, "SA": 12, "UB": 12}
    for prompt, paths in table.select("prompt", "image_paths").iter_rows():
        assert prompt.count(IMAGE_MARKER) == len(paths)


def test_no_future_item_anywhere():
    table, _ = run(n=40)
    for row in table.iter_rows(named=True):
        text = row["prompt"] + row["target"] + " ".join(row["image_paths"])
        assert "Secret Future Item" not in text and "violet" not in text and "img/6.png" not in text


def test_ub_windows_come_from_train_sequences():
    items = make_items()
    title_of = dict(zip(items["item_idx"], items["title"]))
    idx_of = {t: i for i, t in title_of.items()}
    table, report = run(tasks=["UB"], n=30, history=2)
    assert report["ub_windows"] == sum(len(s) - 1 for s in TRAIN)
    for prompt, paths, target in table.select("prompt", "image_paths", "target").iter_rows():
        shown = re.findall(r"^\d+\. (?:<image> )?(.+?)(?: \(.*\))?$", prompt, flags=re.M)
        window = [idx_of[t] for t in shown] + [idx_of[target]]
        assert 2 <= len(window) <= 3  # 1..history items, then the target
        # the shown items and the target are consecutive in some training sequence
        assert any(seq[p : p + len(window)] == window for seq in TRAIN for p in range(len(seq)))
        # each shown item with an image carries exactly its own image
        assert paths == [f"img/{i}.png" for i in window[:-1] if i != 3]


def test_it_targets_and_image_fallback():
    table, report = run(tasks=["IT"], n=10)  # 5 train items: every item exactly twice
    it = table.filter(pl.col("task") == "IT")
    assert report["it_text_fallback"] == 2 and report["it_with_image"] == 8  # item 3 has no image
    fallback = it.filter(pl.col("image_paths").list.len() == 0)
    assert fallback["prompt"].str.starts_with("Item: Green Mug").all()
    shoe = it.filter(pl.col("image_paths").list.first() == "img/1.png")["target"].to_list()
    assert shoe == ["Red Shoe. A red shoe. Its colour is red and its category is shoe."] * 2

    text_only, report = run(tasks=["IT"], n=10, use_images=False)
    assert report["it_text_fallback"] == 10 and text_only["image_paths"].list.len().sum() == 0
    assert IMAGE_MARKER not in "".join(text_only["prompt"])


def test_sa_targets():
    table, report = run(tasks=["SA"], n=8)
    assert report["sa_items_without_text"] == 1  # item 4: no description, no attributes
    assert "Plain Box" not in "".join(table["prompt"])
    watch = table.filter(pl.col("prompt").str.starts_with("Title: Gold Watch"))
    assert watch.height == 2
    assert watch["prompt"][0].startswith("Title: Gold Watch\nAttributes: material: gold; price: 99.5\n")
    assert set(watch["target"]) == {"A gold watch."}


def test_deterministic_and_task_independent():
    a, _ = run(seed=3)
    b, _ = run(seed=3)
    c, _ = run(seed=4)
    assert a.equals(b)
    assert not a.equals(c)
    only_sa, _ = run(tasks=["SA"], seed=3)
    assert only_sa.equals(a.filter(pl.col("task") == "SA"))  # dropping IT/UB does not change SA


def test_unknown_task_and_missing_items():
    with pytest.raises(ValueError, match="unknown task"):
        run(tasks=["XX"])
    with pytest.raises(ValueError, match="item_idx"):
        synthesize(make_items(), [[1, 99]], ["SA"], 2, 0, 2, True)


def test_sentences():
    assert attribute_sentence('{"brand": "Acme"}') == "Its brand is Acme."
    assert attribute_sentence({"a": 1, "b": [2, 3], "c": ""}) == "Its a is 1 and its b is 2, 3."
    assert attribute_sentence("{}") == ""
    assert detailed_description("Cup", "", None) == "Cup."


def test_stage_writes_table_and_report(tmp_path: Path, monkeypatch):
    from stages.sft_data import SFT_DATA, main

    monkeypatch.chdir(tmp_path)
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    make_items().write_parquet(processed / "items.parquet")
    pl.DataFrame({"user_idx": [0, 1, 2], "user_id": ["a", "b", "c"], "items": TRAIN}).write_parquet(processed / "train.parquet")
    pl.DataFrame({"user_idx": [0, 1, 2], "history": TRAIN, "target": [4, 1, 6]}).write_parquet(processed / "valid.parquet")
    pl.DataFrame({"user_idx": [0, 1, 2], "history": TRAIN, "target": [6, 6, 6]}).write_parquet(processed / "test.parquet")
    (tmp_path / "params.yaml").write_text("seed: 1\nsft:\n  mix: [IT, UB]\n  samples_per_task: 5\nmirm:\n  modalities: [text]\n")
    main(Path("params.yaml"))
    table = pl.read_parquet(SFT_DATA)
    assert dict(table.schema) == SCHEMA and table.height == 10
    assert table["image_paths"].list.len().sum() == 0  # text-only modality: no images anywhere
    report = json.loads((tmp_path / "metrics" / "sft.json").read_text())
    assert report["tasks"] == {"IT": 5, "UB": 5} and report["it_text_fallback"] == 5
