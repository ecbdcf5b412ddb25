import pytest

from molar.config import SplitParams
from molar.data.schema import make_interactions, make_items
from molar.data.split import build_split, load_split


def _items(ids):
    return make_items([{"item_id": i, "title": f"t{i}", "description": "", "attributes": "{}", "image_path": None} for i in ids])


def test_leave_one_out_by_eye():
    # user a: times 3,1,2,5 -> chronological b,c,a,d ; user z: x,y,x? no repeats: y(1) then a(1) tie -> source order
    rows = [
        ("a", "A", 3), ("a", "B", 1), ("a", "C", 2), ("a", "D", 5),
        ("z", "B", 7), ("z", "A", 7), ("z", "C", 9),
    ]
    tables, stats = build_split(_items(["A", "B", "C", "D", "E"]), make_interactions(rows), SplitParams())
    items = tables["items"]
    # E has no interaction: not in the catalog; others keep catalog order, 1-based
    assert items["item_id"].to_list() == ["A", "B", "C", "D"]
    assert items["item_idx"].to_list() == [1, 2, 3, 4]
    A, B, C, D = 1, 2, 3, 4
    train = tables["train"].sort("user_idx")
    assert train["user_id"].to_list() == ["a", "z"]
    assert train["items"].to_list() == [[B, C], [B]]  # z: B and A tie at t=7 -> source order B, A
    valid = tables["valid"].sort("user_idx")
    assert valid["history"].to_list() == [[B, C], [B]]
    assert valid["target"].to_list() == [A, A]
    test = tables["test"].sort("user_idx")
    assert test["history"].to_list() == [[B, C, A], [B, A]]
    assert test["target"].to_list() == [D, C]
    assert stats["rows_in"] == 7 and stats["rows_out"] == 7 and stats["items_without_interactions"] == 1


def test_order_breaks_ties_when_no_timestamps():
    rows = [("u", "C", None), ("u", "A", None), ("u", "B", None)]
    tables, _ = build_split(_items(["A", "B", "C"]), make_interactions(rows), SplitParams())
    idx = dict(zip(tables["items"]["item_id"], tables["items"]["item_idx"]))
    assert tables["train"]["items"].to_list() == [[idx["C"]]]
    assert tables["test"]["target"].to_list() == [idx["B"]]


def test_min_length_and_k_core_are_reported():
    rows = [("a", "A", 1), ("a", "B", 2), ("a", "C", 3), ("b", "A", 1), ("b", "B", 2), ("c", "A", 1), ("c", "B", 2), ("c", "C", 3)]
    tables, stats = build_split(_items(["A", "B", "C"]), make_interactions(rows), SplitParams(min_user_length=3))
    assert tables["train"]["user_id"].to_list() == ["a", "c"]
    assert stats["rows_dropped"]["user_shorter_than_3"] == 2
    # 3-core: item C has 2 users -> removed, then every user has 2 items -> removed: nothing left
    with pytest.raises(ValueError, match="no user has enough interactions"):
        build_split(_items(["A", "B", "C"]), make_interactions(rows), SplitParams(k_core=3))
    # 2-core keeps everything; then min length 3 drops b
    _, stats2 = build_split(_items(["A", "B", "C"]), make_interactions(rows), SplitParams(k_core=2))
    assert stats2["rows_dropped"]["k_core_2"] == 0


def test_load_split_roundtrip(tmp_path):
    rows = [("a", "A", 1), ("a", "B", 2), ("a", "C", 3), ("b", "C", 1), ("b", "A", 2), ("b", "B", 3)]
    tables, _ = build_split(_items(["A", "B", "C"]), make_interactions(rows), SplitParams())
    for name, df in tables.items():
        df.write_parquet(tmp_path / f"{name}.parquet")
    s = load_split(tmp_path)
    assert s.n_items == 3 and s.n_users == 2
    assert s.train == [[1], [3]]
    assert s.valid.targets == [2, 1] and s.test.targets == [3, 2]
    assert s.test.histories == [[1, 2], [3, 1]]


def test_load_split_missing_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `molar split` first"):
        load_split(tmp_path)
