"""The HTML gallery: each model's top-k in order, history masked, the target marked, a folder that
stands alone (relative image links that resolve, placeholders for missing images), escaped text."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image

from molar.data.split import SplitData, Targets
from molar.errors import UserError
from molar.gallery import sample_test_rows, write_gallery

N_ITEMS = 7
TRICKY_TITLE = '<b>&"x"'  # item 3
MISSING_FILE, NO_IMAGE = 6, 7  # item 6 names a file that is not there, item 7 names none
USER_IDS = ["u0", "u1", "u<2>"]
# test split: user row -> (history, target)
TEST = {0: ([1, 2], 3), 1: ([4], 6), 2: ([5, 1, 7], 2)}


def ascending(histories: list[list[int]]) -> torch.Tensor:
    """Item 7 best, then 6, 5, ...: the same row for everyone."""
    return torch.arange(N_ITEMS + 1, dtype=torch.float32).expand(len(histories), -1)


def tied(histories: list[list[int]]) -> torch.Tensor:
    """Every item ties (ranked by lower item_idx), padding scores highest and must never show."""
    row = torch.full((N_ITEMS + 1,), 2.0)
    row[0] = 9.0
    return row.expand(len(histories), -1)


SCORERS = {"ascending": ascending, "tied": tied}
# top 3 per user with the history masked (see the scorers above)
EXPECTED = {
    "ascending": {"u0": [7, 6, 5], "u1": [7, 6, 5], "u<2>": [6, 4, 3]},
    "tied": {"u0": [3, 4, 5], "u1": [1, 2, 3], "u<2>": [2, 3, 4]},
}


@pytest.fixture()
def image_root(tmp_path: Path) -> Path:
    """A repository-like root with the images of items 1..5 (item 6's file is missing)."""
    root = tmp_path / "repo"
    (root / "images").mkdir(parents=True)
    for item in range(1, 6):
        Image.new("RGB", (4, 4), (40 * item, 0, 0)).save(root / "images" / f"i{item}.png")
    return root


@pytest.fixture()
def split() -> SplitData:
    titles = [f"Item {i}" for i in range(1, N_ITEMS + 1)]
    titles[2] = TRICKY_TITLE
    image_paths = [f"images/i{i}.png" for i in range(1, N_ITEMS)] + [None]
    items = pl.DataFrame(
        {
            "item_idx": list(range(1, N_ITEMS + 1)),
            "item_id": [f"m{i}" for i in range(1, N_ITEMS + 1)],
            "title": titles,
            "description": [""] * N_ITEMS,
            "attributes": ["{}"] * N_ITEMS,
            "image_path": image_paths,
        },
        schema_overrides={"image_path": pl.String},
    )
    rows = sorted(TEST)
    test = Targets(rows, [TEST[r][0] for r in rows], [TEST[r][1] for r in rows])
    valid = Targets(rows, [h[:-1] for h in test.histories], [h[-1] for h in test.histories])
    return SplitData(items=items, user_ids=USER_IDS, train=[h[:-1] for h in valid.histories], valid=valid, test=test)


class Page(HTMLParser):
    """The cards of a gallery page, with the user and row they are in, and every link it makes."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.links: list[str] = []  # every src and href
        self.img_srcs: list[str] = []
        self.users: list[str] = []
        self._user = self._row = None
        self._card: dict | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [value for name, value in attrs if name in ("src", "href") and value is not None]
        if tag == "section":
            self._user = a["data-user"]
            self.users.append(self._user)
        elif tag == "div" and "data-row" in a:
            self._row = a["data-row"]
        elif tag == "figure":
            self._card = {"user": self._user, "row": self._row, "item": int(a["data-item"]),
                          "classes": a["class"].split(), "img": None, "placeholder": False, "text": "", "rank": None}
            self.cards.append(self._card)
        elif tag == "img":
            self.img_srcs.append(a["src"])
            if self._card is not None:
                self._card["img"] = a["src"]
        elif self._card is not None and a.get("class") in ("placeholder", "rank"):
            self._card[a["class"]] = True  # a rank's number is its next text

    def handle_endtag(self, tag: str) -> None:
        if tag == "figure":
            self._card = None

    def handle_data(self, data: str) -> None:
        if self._card is not None:
            self._card["text"] += data
            if self._card["rank"] is True:
                self._card["rank"] = data

    def row(self, user: str, row: str) -> list[dict]:
        return [c for c in self.cards if c["user"] == user and c["row"] == row]


def write(split: SplitData, image_root: Path, out: Path, scorers=SCORERS, **kwargs) -> tuple[Path, Page]:
    index = write_gallery(split, scorers, out, image_root=image_root, **{"k": 3, **kwargs})
    return index, Page(index.read_text(encoding="utf-8"))


def test_each_model_shows_its_top_k_in_order_without_history(split, image_root, tmp_path) -> None:
    index, page = write(split, image_root, tmp_path / "gallery")
    assert index == tmp_path / "gallery" / "index.html"
    assert page.users == USER_IDS  # n_users (6) > 3 test users: all of them, in split order
    for row, (history, _) in TEST.items():
        user = USER_IDS[row]
        assert [c["item"] for c in page.row(user, "history")] == history
        for model, expected in EXPECTED.items():
            shown = page.row(user, model)
            assert [c["item"] for c in shown] == expected[user]
            assert not set(history) & {c["item"] for c in shown} and 0 not in {c["item"] for c in shown}
            assert [c["rank"] for c in shown] == ["#1", "#2", "#3"]


def test_mask_history_off_and_history_shown(split, image_root, tmp_path) -> None:
    _, page = write(split, image_root, tmp_path / "gallery", mask_history=False, history_shown=2)
    assert [c["item"] for c in page.row("u<2>", "ascending")] == [7, 6, 5]  # 5 and 7 are in its history
    assert [c["item"] for c in page.row("u<2>", "history")] == [1, 7]  # the last two, oldest first


def test_target_is_marked_exactly_where_it_is(split, image_root, tmp_path) -> None:
    _, page = write(split, image_root, tmp_path / "gallery")
    hits = {(c["user"], c["row"], c["item"]) for c in page.cards if "hit" in c["classes"]}
    # u0's target 3 is #1 of tied; u1's target 6 is #2 of ascending; u<2>'s target 2 is #1 of tied
    assert hits == {("u0", "tied", 3), ("u1", "ascending", 6), ("u<2>", "tied", 2)}
    assert all(("next item" in c["text"]) == ("hit" in c["classes"]) for c in page.cards)
    text = (tmp_path / "gallery" / "index.html").read_text(encoding="utf-8")
    assert "next item at rank 2" in text and "next item not in the top 3" in text


def test_target_in_history_is_not_masked_as_in_evaluation(split, image_root, tmp_path) -> None:
    test = Targets([0], [[1, 7]], [7])  # re-consumption: the target was seen before
    again = SplitData(items=split.items, user_ids=["u0"], train=[[1]], valid=Targets([0], [[1]], [7]), test=test)
    _, page = write(again, image_root, tmp_path / "gallery", scorers={"ascending": ascending})
    assert [c["item"] for c in page.row("u0", "ascending")] == [7, 6, 5]
    assert "hit" in page.row("u0", "ascending")[0]["classes"] and "hit" in page.row("u0", "history")[1]["classes"]


def test_folder_stands_alone_with_only_the_images_shown(split, image_root, tmp_path) -> None:
    out = tmp_path / "gallery"
    _, page = write(split, image_root, out, k=1, history_shown=1, scorers={"ascending": ascending})
    # shown: histories [2], [4], [7]; recommended 7, 7, 6; 6 and 7 have no image file
    assert sorted(p.name for p in (out / "images").iterdir()) == ["2.png", "4.png"]
    assert page.img_srcs and all(src.startswith("images/") and (out / src).is_file() for src in page.img_srcs)
    assert all(not Path(link).is_absolute() and "://" not in link for link in page.links)


def test_every_img_resolves_and_missing_images_get_a_placeholder(split, image_root, tmp_path) -> None:
    out = tmp_path / "gallery"
    _, page = write(split, image_root, out)
    for card in page.cards:
        if card["item"] in (MISSING_FILE, NO_IMAGE):
            assert card["img"] is None and card["placeholder"] and f"Item {card['item']}" in card["text"]
        else:
            assert (out / card["img"]).is_file() and not card["placeholder"]
    assert Image.open(out / "images" / "1.png").size == (4, 4)


def test_text_from_data_is_escaped(split, image_root, tmp_path) -> None:
    index, page = write(split, image_root, tmp_path / "gallery", scorers={"a<i>&": ascending})
    text = index.read_text(encoding="utf-8")
    assert TRICKY_TITLE not in text and "&lt;b&gt;&amp;&quot;x&quot;" in text
    assert "<i>" not in text and "u<2>" not in text
    assert any(TRICKY_TITLE in c["text"] for c in page.cards if c["item"] == 3)
    assert page.row("u<2>", "a<i>&")  # parsed back to the raw name and id


def test_same_seed_same_page_and_users_are_sampled(split, image_root, tmp_path) -> None:
    first, _ = write(split, image_root, tmp_path / "a", n_users=2, seed=7)
    second, page = write(split, image_root, tmp_path / "b", n_users=2, seed=7)
    assert first.read_text(encoding="utf-8") == second.read_text(encoding="utf-8")
    assert len(page.users) == 2 and page.users == [USER_IDS[r] for r in sample_test_rows(3, 2, 7)]
    rows = sample_test_rows(100, 5, 3)
    assert rows == sorted(set(rows)) and len(rows) == 5 and rows == sample_test_rows(100, 5, 3)


def test_rewrite_replaces_the_folder(split, image_root, tmp_path) -> None:
    out = tmp_path / "gallery"
    (out / "images").mkdir(parents=True)
    (out / "images" / "stale.png").write_bytes(b"old")
    write(split, image_root, out)
    assert not (out / "images" / "stale.png").exists() and (out / "index.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_wrong_shape_names_the_model_and_leaves_the_old_gallery(split, image_root, tmp_path) -> None:
    out = tmp_path / "gallery"
    write(split, image_root, out)
    before = (out / "index.html").read_text(encoding="utf-8")
    broken = {"ascending": ascending, "broken": lambda histories: torch.zeros(len(histories), N_ITEMS)}
    with pytest.raises(UserError, match=r"'broken'.*\(3, 7\).*\(3, 8\)"):
        write(split, image_root, out, scorers=broken)
    assert (out / "index.html").read_text(encoding="utf-8") == before


@pytest.mark.parametrize(
    "kwargs, message",
    [({"scorers": {}}, "no scorers"), ({"k": 0}, "k must be at least 1"), ({"n_users": 0}, "n_users must be at least 1")],
)
def test_bad_arguments_are_user_errors(split, image_root, tmp_path, kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        write(split, image_root, tmp_path / "gallery", **kwargs)
    assert not (tmp_path / "gallery").exists()
