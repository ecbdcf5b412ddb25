"""A static HTML gallery of sample recommendations: which items each model shows a few test users.

Metrics say how often the next item lands in the top K; the gallery shows *which* items, with their
pictures, so a reader sees at a glance whether a model recommends plausible things, the same popular
items to everyone, or the user's own history back. The output is one self-contained folder
(``index.html`` with inline CSS and no JavaScript, plus ``images/`` with only the images shown,
linked by relative paths), so it can be zipped, committed or opened from file://.

Item images: ``split.items["image_path"]`` is the path ingest recorded, relative to the repository
root (the folder DVC runs the stages in) unless the source's data.path was absolute:
``data/interim/images/i00000.png`` on the embedded default (drawn by ingest),
``<data.path's folder>/posters/<MovieID>.jpg`` for MovieLens. The pipeline opens them relative to the
working directory (``PromptEncoder``'s ``image_root``, ``"."``, molar/models/mirm.py), so
``image_root`` is the repository root for every source. An item with no image, or whose file is
not there, gets a placeholder box with its title.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from molar.errors import UserError
from molar.io import atomic_path

if TYPE_CHECKING:  # torch loads only when a gallery is written: `molar --help` stays fast
    import polars as pl
    import torch

    from molar.data.split import SplitData
    from molar.evaluate import ScoreFn


def top_k(scores, history: Sequence[int], k: int, mask_history: bool) -> list[tuple[int, float]]:
    """The ``k`` best (item_idx, score) from one score row [n_items + 1] (column 0 = padding).

    Padding and, when ``mask_history``, the history's items are never returned; exactly ``k``
    items come back, or an error says how many candidates there are.
    """
    import torch

    scores = scores.detach().float().clone()
    scores[0] = float("-inf")
    excluded = {0}
    if mask_history:
        excluded |= {int(i) for i in history}
        scores[sorted(excluded)] = float("-inf")
    candidates = scores.shape[0] - len(excluded)
    if k < 1 or k > candidates:
        raise UserError(f"--k must be between 1 and {candidates} (the catalog minus padding and masked history), got {k}")
    # stable order among ties: highest score first, then the lower item id
    order = torch.argsort(-scores, stable=True)[:k]
    return [(int(i), float(scores[i])) for i in order]


@dataclass(frozen=True)
class _Catalog:
    """Item fields indexed by item_idx; index 0 (padding) is empty, so ``titles[item_idx]`` reads straight."""

    item_ids: list[str]
    titles: list[str]
    image_paths: list[str | None]

    @classmethod
    def from_items(cls, items: pl.DataFrame) -> _Catalog:
        def column(name: str) -> list:
            return [None, *items[name].to_list()]

        return cls(column("item_id"), [t or "" for t in column("title")], column("image_path"))


@dataclass(frozen=True)
class _UserPage:
    """What the page shows for one test user."""

    user_id: str
    history: list[int]  # the last ``history_shown`` items of the test history, oldest first
    target: int  # the test target: the user's true next item
    recommended: dict[str, list[int]]  # model name -> its top-k item_idx, best first


def write_gallery(
    split: SplitData,
    scorers: dict[str, ScoreFn],
    out_dir: Path,
    *,
    image_root: Path,
    n_users: int = 6,
    k: int = 10,
    history_shown: int = 8,
    mask_history: bool = True,
    seed: int = 42,
    title: str = "molar: sample recommendations",
) -> Path:
    """Write ``out_dir/index.html`` (and ``out_dir/images/``): each model's top-``k`` for ``n_users``
    test users, and return the path of index.html.

    Args:
        split: the processed split; its test users, histories and targets are what is shown.
        scorers: model name -> score function (``molar.evaluate.ScoreFn``: histories -> [users,
            n_items + 1], column 0 = padding), one row of cards each, in the dict's order.
        out_dir: replaced as a whole, atomically: a reader never sees half a gallery.
        image_root: the folder ``split.items["image_path"]`` is relative to (module docstring):
            the repository root.
        n_users: test users shown, drawn with ``seed`` (all of them when there are fewer).
        history_shown: how many of each user's latest history items are shown.
        mask_history: as ``eval.mask_history``: history items are never recommended, except the
            target itself, which the evaluator never masks either. Ties rank the lower item_idx
            first, so a tie with the target can show a hit that the evaluator (ties pessimistic)
            does not count.
    """
    _check_arguments(scorers, k, n_users, history_shown)
    rows = sample_test_rows(len(split.test.user_idx), n_users, seed)
    users = _user_pages(split, scorers, rows, k=k, history_shown=history_shown, mask_history=mask_history)
    catalog = _Catalog.from_items(split.items)
    shown = {item for user in users for item in _items_on_page(user)}
    note = (
        f"{len(users)} of {len(split.test.user_idx)} test users (seed {seed}); top {k} per model"
        f"{', history items excluded' if mask_history else ''}. The user's true next item (the test target) "
        "has an orange border and a <span class=\"badge\">next item</span> badge."
    )
    with atomic_path(out_dir) as tmp:
        (tmp / "images").mkdir(parents=True)
        image_src = _copy_images(shown, catalog.image_paths, image_root, tmp / "images")
        page = _render_page(title, note, [_render_user(user, catalog, image_src, k) for user in users])
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out_dir / "index.html"


# ------------------------------------------------------------------------- choosing what to show


def _check_arguments(scorers: dict, k: int, n_users: int, history_shown: int) -> None:
    if not scorers:
        raise UserError("gallery: no scorers given; pass at least one model name -> score function")
    if k < 1:
        raise UserError(f"gallery: k must be at least 1, got {k}")
    if n_users < 1:
        raise UserError(f"gallery: n_users must be at least 1, got {n_users}")
    if history_shown < 0:
        raise UserError(f"gallery: history_shown must be 0 or more, got {history_shown}")


def sample_test_rows(n_test: int, n_users: int, seed: int) -> list[int]:
    """``n_users`` distinct rows of the test split (all when there are fewer), drawn from ``seed``
    and sorted, so the same seed gives the same page, users in split order."""
    import numpy as np

    if n_test == 0:
        raise UserError("gallery: the split has no test users")
    rng = np.random.default_rng(seed)
    return sorted(int(row) for row in rng.choice(n_test, size=min(n_users, n_test), replace=False))


def _user_pages(
    split: SplitData, scorers: dict[str, ScoreFn], rows: list[int], *, k: int, history_shown: int, mask_history: bool
) -> list[_UserPage]:
    """Score the test users of ``rows`` with every model (one call each) and keep what the page shows."""
    import torch

    histories = [[int(i) for i in split.test.histories[row]] for row in rows]
    targets = [int(split.test.targets[row]) for row in rows]
    recommended: dict[str, list[list[int]]] = {}
    with torch.no_grad():
        for name, score_fn in scorers.items():
            scores = _checked_scores(name, score_fn, histories, split.n_items)
            recommended[name] = [_recommend(scores[u], histories[u], targets[u], k, mask_history) for u in range(len(rows))]
    return [
        _UserPage(
            user_id=split.user_ids[split.test.user_idx[row]],
            history=histories[u][max(len(histories[u]) - history_shown, 0) :],  # not [-0:], the whole list
            target=targets[u],
            recommended={name: per_user[u] for name, per_user in recommended.items()},
        )
        for u, row in enumerate(rows)
    ]


def _checked_scores(name: str, score_fn: ScoreFn, histories: list[list[int]], n_items: int) -> torch.Tensor:
    """``score_fn(histories)``, or an error naming the model when its shape is not [users, n_items + 1]
    (a model trained on another catalog would otherwise show wrong items without a word)."""
    scores = score_fn(histories)
    expected = (len(histories), n_items + 1)
    got = tuple(getattr(scores, "shape", ()))
    if got != expected:
        raise UserError(
            f"gallery: scorer {name!r} returned scores of shape {got}; expected {expected} "
            f"({len(histories)} histories x {n_items} items + the padding column 0)"
        )
    return scores


def _recommend(scores: torch.Tensor, history: Sequence[int], target: int, k: int, mask_history: bool) -> list[int]:
    """The top-``k`` item_idx of one score row, best first; fewer when fewer items are left to rank
    (a user who saw most of a tiny catalog), rather than an error.

    As in evaluation, the target is never masked, even when it is in the history."""
    masked = [i for i in history if i != target]
    candidates = len(scores) - 1 - (len(set(masked)) if mask_history else 0)
    k = min(k, candidates)
    return [item for item, _ in top_k(scores, masked, k, mask_history)] if k > 0 else []


def _items_on_page(user: _UserPage) -> Iterable[int]:
    yield from user.history
    for items in user.recommended.values():
        yield from items


def _copy_images(items: Iterable[int], image_paths: Sequence[str | None], image_root: Path, images_dir: Path) -> dict[int, str]:
    """Copy the image of each item into ``images_dir`` as ``<item_idx><suffix>``; return item_idx ->
    its src relative to index.html. Items with no image file are left out: they get a placeholder."""
    src: dict[int, str] = {}
    for item in sorted(set(items)):
        recorded = image_paths[item]
        source = Path(image_root) / recorded if recorded else None  # an absolute recorded path stays as it is
        if source is None or not source.is_file():
            continue
        name = f"{item}{source.suffix}"
        shutil.copyfile(source, images_dir / name)
        src[item] = f"images/{name}"
    return src


# ------------------------------------------------------------------------------------ rendering

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
h1 { font-size: 1.4rem; } h2 { font-size: 1.1rem; margin: 0 0 .5rem; }
.note { color: #555; }
.user { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 1rem; margin: 1rem 0; }
.row { display: flex; gap: .75rem; align-items: flex-start; margin: .5rem 0; }
.label { width: 9rem; flex: none; font-weight: 600; overflow-wrap: anywhere; }
.verdict { display: block; font-weight: normal; font-size: .8rem; color: #777; }
.verdict.found { color: #c2410c; }
.cards { display: flex; flex-wrap: wrap; gap: .5rem; }
.card { width: 104px; margin: 0; padding: 3px; border: 3px solid transparent; border-radius: 4px; font-size: .75rem; }
.card img, .placeholder { width: 96px; height: 96px; object-fit: contain; background: #eee; display: block; }
.placeholder { display: flex; align-items: center; justify-content: center; text-align: center; color: #666;
  overflow: hidden; border: 1px dashed #bbb; box-sizing: border-box; padding: 4px; }
.card figcaption { margin-top: 2px; max-height: 3.6em; overflow: hidden; }
.rank { font-weight: 700; margin-right: .25rem; }
.hit { border-color: #ea580c; background: #fff7ed; }
.badge { background: #ea580c; color: #fff; border-radius: 3px; padding: 0 .3rem; font-size: .7rem; white-space: nowrap; }
"""


def _render_page(title: str, note: str, sections: list[str]) -> str:
    """``note`` is HTML (it shows the badge); everything from data was escaped where it was rendered."""
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en">',
            f'<head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head>',
            "<body>",
            f"<h1>{html.escape(title)}</h1>",
            f'<p class="note">{note}</p>',
            *sections,
            "</body>",
            "</html>",
            "",
        ]
    )


def _render_user(user: _UserPage, catalog: _Catalog, image_src: dict[int, str], k: int) -> str:
    """One user's section: the history row, then one row per model with whether it found the target."""
    history = [_render_card(item, catalog, image_src, user.target) for item in user.history]
    rows = [_render_row("history", f"history (last {len(history)}, oldest first)", history)]
    for name, items in user.recommended.items():
        cards = [_render_card(item, catalog, image_src, user.target, rank) for rank, item in enumerate(items, start=1)]
        rows.append(_render_row(name, html.escape(name) + _render_verdict(items, user.target, k), cards))
    user_id = html.escape(user.user_id)
    return "\n".join([f'<section class="user" data-user="{user_id}">', f"<h2>user {user_id}</h2>", *rows, "</section>"])


def _render_verdict(items: list[int], target: int, k: int) -> str:
    if target in items:
        return f'<span class="verdict found">next item at rank {items.index(target) + 1}</span>'
    return f'<span class="verdict missed">next item not in the top {k}</span>'


def _render_row(row: str, label: str, cards: list[str]) -> str:
    """One labelled row of cards; ``row`` ("history" or a model name) is kept in data-row for scripts and tests."""
    return (
        f'<div class="row" data-row="{html.escape(row)}"><div class="label">{label}</div>'
        f'<div class="cards">{"".join(cards)}</div></div>'
    )


def _render_card(item: int, catalog: _Catalog, image_src: dict[int, str], target: int, rank: int | None = None) -> str:
    """An item's image (or a placeholder box with its title), rank and title; the target is marked."""
    title = html.escape(catalog.titles[item])
    if item in image_src:
        picture = f'<img src="{html.escape(image_src[item])}" alt="{title}">'
    else:
        picture = f'<div class="placeholder">{title}</div>'
    rank_html = f'<span class="rank">#{rank}</span> ' if rank is not None else ""
    badge = ' <span class="badge">next item</span>' if item == target else ""
    classes = "card hit" if item == target else "card"
    return (
        f'<figure class="{classes}" data-item="{item}" title="{html.escape(catalog.item_ids[item])}: {title}">{picture}'
        f"<figcaption>{rank_html}{title}{badge}</figcaption></figure>"
    )
