import json
from collections import Counter

import numpy as np
from PIL import Image

from molar.config import DataParams, SyntheticData
from molar.data.readers.synthetic import COLOURS, generate
from molar.data.schema import IngestReport

SMALL = DataParams(synthetic=SyntheticData(n_users=60, n_items=40, min_length=5, max_length=12))


def _run(tmp_path, seed=7, name="a"):
    return generate(SMALL, seed, tmp_path / name, IngestReport("synthetic"))


def test_same_seed_same_tables_and_image_bytes(tmp_path):
    items1, inter1 = _run(tmp_path, 7, "a")
    items2, inter2 = _run(tmp_path, 7, "b")
    assert inter1.equals(inter2)
    assert items1.drop("image_path").equals(items2.drop("image_path"))
    for p1, p2 in zip(items1["image_path"], items2["image_path"]):
        assert open(p1, "rb").read() == open(p2, "rb").read()
    _, inter3 = _run(tmp_path, 8, "c")
    assert not inter1.equals(inter3)


def test_images_follow_attributes(tmp_path):
    items, _ = _run(tmp_path)
    for row in items.iter_rows(named=True):
        attrs = json.loads(row["attributes"])
        img = np.asarray(Image.open(row["image_path"]).convert("RGB")).reshape(-1, 3)
        # the item's colour is the most common non-background colour in its picture
        colours, counts = np.unique(img, axis=0, return_counts=True)
        order = np.argsort(-counts)
        top = [tuple(int(v) for v in colours[i]) for i in order[:3]]
        assert COLOURS[attrs["colour"]] in top, (attrs, top)


def test_histories_are_plausible(tmp_path):
    _, inter = _run(tmp_path)
    per_user = inter.group_by("user_id", maintain_order=True).agg("item_id", "timestamp")
    for items, times in zip(per_user["item_id"].to_list(), per_user["timestamp"].to_list()):
        assert 5 <= len(items) <= 12
        assert len(set(items)) == len(items)  # no repeats
        assert times == sorted(times)
    counts = Counter(inter["item_id"].to_list())
    top = sum(c for _, c in counts.most_common(4))  # 10% of the catalog
    assert top / inter.height > 0.15  # popularity skew: the top 10% of items take well over 10%


def test_transitions_repeat_across_users(tmp_path):
    # hidden successors make some item->item transitions far more common than chance
    _, inter = _run(tmp_path)
    pairs = Counter()
    for items in inter.group_by("user_id", maintain_order=True).agg("item_id")["item_id"].to_list():
        pairs.update(zip(items, items[1:]))
    assert pairs.most_common(1)[0][1] >= 4
