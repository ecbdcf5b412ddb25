"""IT / SA / UB fine-tuning data for MIRM, synthesised from the training split only.

Each example is (task, prompt, image_paths, target): the prompt marks where image i goes with
``<image>`` (``IMAGE_MARKER``), the target is the answer text.

- IT (image -> text): an item's image, asked for a detailed description; the answer is built from
  its text fields (title, description, attribute sentence). Items without an image, or every item
  when images are not a modality, fall back to the title as input (counted in the report).
- SA (structured attributes -> text): title + rendered attributes, asked for a description; the
  answer is the item's description (or, when it has none, a sentence built from the attributes).
- UB (user behaviour): a window of ``ub_history`` consecutive items of a user's training sequence
  (each shown with image and text), asked for the next item's title; the answer is the title of
  the item that follows the window in the same training sequence.

No leakage: only training sequences are read (train.parquet = each user's sequence minus its
validation and test items), IT and SA only use items that occur in them, and UB windows and
targets lie inside them. Deterministic: task t draws from ``numpy.random.default_rng([seed, t])``
(t = index in IT, SA, UB), so dropping a task from ``sft.mix`` leaves the others' samples as they were.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

TASKS = ("IT", "SA", "UB")
IMAGE_MARKER = "<image>"  # where a prompt shows image i of image_paths (molar/models/mirm.py replaces it)
SCHEMA = {"task": pl.String, "prompt": pl.String, "image_paths": pl.List(pl.String), "target": pl.String}

# A few phrasings per task, drawn per example, so the model does not key on one fixed sentence.
IT_INSTRUCTIONS = (
    "Describe this item in detail.",
    "Give a detailed description of the item shown.",
    "What is this item? Describe it fully.",
)
SA_INSTRUCTIONS = (
    "Write a natural-language description of this item from its title and attributes.",
    "Describe the item given its title and attributes.",
    "Turn the title and attributes into a short product description.",
)
UB_INSTRUCTIONS = (
    "The user recently interacted with these items, oldest first. Predict the title of the next item.",
    "Given the user's recent items in order, what is the title of the item they choose next?",
)


@dataclass(frozen=True)
class SftExample:
    task: str
    prompt: str
    image_paths: list[str]
    target: str


def render_attributes(attributes: str | dict | None) -> str:
    """``{"brand": "Acme", "price": 9.5}`` -> ``brand: Acme; price: 9.5`` (keys in stored order)."""
    if not attributes:
        return ""
    data = json.loads(attributes) if isinstance(attributes, str) else attributes
    if not isinstance(data, dict):
        return str(data)
    parts = []
    for key, value in data.items():
        if value in (None, "", []):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{key}: {shown}")
    return "; ".join(parts)


def attribute_sentence(attributes: str | dict | None) -> str:
    """``{"brand": "Acme", "colour": "red"}`` -> ``Its brand is Acme and its colour is red.``"""
    data = json.loads(attributes) if isinstance(attributes, str) and attributes else (attributes or {})
    parts = []
    for key, value in (data.items() if isinstance(data, dict) else []):
        if value in (None, "", []):
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"its {key} is {shown}")
    if not parts:
        return ""
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def detailed_description(title: str, description: str, attributes: str | None) -> str:
    pieces = [f"{title.rstrip('.')}."] if title else []
    if description:
        pieces.append(description.strip())
    sentence = attribute_sentence(attributes)
    if sentence:
        pieces.append(sentence)
    return " ".join(pieces)


def _draw(rng: np.random.Generator, candidates: Sequence, n: int) -> list:
    """``n`` draws that visit every candidate once per round, in a fresh random order each round."""
    out: list = []
    while len(out) < n:
        out.extend(candidates[i] for i in rng.permutation(len(candidates)))
    return out[:n]


def _item_line(row: dict, use_images: bool) -> tuple[str, list[str]]:
    """How one history item is shown in a UB prompt: image marker (if any) + title + attributes."""
    attrs = render_attributes(row["attributes"])
    text = row["title"] + (f" ({attrs})" if attrs else "")
    if use_images and row["image_path"] is not None:
        return f"{IMAGE_MARKER} {text}", [row["image_path"]]
    return text, []


def synthesize(
    items: pl.DataFrame,
    train: Sequence[Sequence[int]],
    tasks: Sequence[str],
    samples_per_task: int,
    seed: int,
    ub_history: int,
    use_images: bool,
) -> tuple[pl.DataFrame, dict]:
    """The SFT table (columns task, prompt, image_paths, target) and a report of what was made.

    ``items``: the processed items table (row i has item_idx i + 1); ``train``: each user's
    training sequence of item_idx.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"sft.mix: unknown task(s) {sorted(unknown)}; allowed: {', '.join(TASKS)}")
    rows = items.select("item_idx", "title", "description", "attributes", "image_path").to_dicts()
    by_idx = {r["item_idx"]: r for r in rows}
    seen = sorted({i for seq in train for i in seq})
    missing = [i for i in seen if i not in by_idx]
    if missing:
        raise ValueError(f"training sequences name item_idx {missing[:5]} that items.parquet lacks")
    report: dict = {"samples_per_task": samples_per_task, "tasks": {}, "train_items": len(seen)}
    examples: list[SftExample] = []

    for t, task in enumerate(TASKS):
        if task not in tasks:
            continue
        rng = np.random.default_rng([seed, t])
        if task == "IT":
            made, fallback = _it(rng, [by_idx[i] for i in seen], samples_per_task, use_images)
            report["it_with_image"] = len(made) - fallback
            report["it_text_fallback"] = fallback
        elif task == "SA":
            usable = [by_idx[i] for i in seen if by_idx[i]["description"] or render_attributes(by_idx[i]["attributes"])]
            report["sa_items_without_text"] = len(seen) - len(usable)
            made = _sa(rng, usable, samples_per_task)
        else:
            windows = [(u, p) for u, seq in enumerate(train) for p in range(1, len(seq))]
            report["ub_windows"] = len(windows)
            made = _ub(rng, windows, train, by_idx, samples_per_task, ub_history, use_images)
        report["tasks"][task] = len(made)
        examples.extend(made)

    table = pl.DataFrame(
        {
            "task": [e.task for e in examples],
            "prompt": [e.prompt for e in examples],
            "image_paths": [e.image_paths for e in examples],
            "target": [e.target for e in examples],
        },
        schema=SCHEMA,
    )
    return table, report


def _it(rng: np.random.Generator, candidates: list[dict], n: int, use_images: bool) -> tuple[list[SftExample], int]:
    if not candidates:
        return [], 0
    out, fallback = [], 0
    for row in _draw(rng, candidates, n):
        instruction = IT_INSTRUCTIONS[rng.integers(len(IT_INSTRUCTIONS))]
        target = detailed_description(row["title"], row["description"], row["attributes"])
        if use_images and row["image_path"] is not None:
            out.append(SftExample("IT", f"{IMAGE_MARKER}\n{instruction}", [row["image_path"]], target))
        else:
            fallback += 1
            out.append(SftExample("IT", f"Item: {row['title']}\n{instruction}", [], target))
    return out, fallback


def _sa(rng: np.random.Generator, candidates: list[dict], n: int) -> list[SftExample]:
    if not candidates:
        return []
    out = []
    for row in _draw(rng, candidates, n):
        instruction = SA_INSTRUCTIONS[rng.integers(len(SA_INSTRUCTIONS))]
        attrs = render_attributes(row["attributes"])
        prompt = f"Title: {row['title']}\nAttributes: {attrs}\n{instruction}"
        target = row["description"] or f"{row['title']}. {attribute_sentence(row['attributes'])}"
        out.append(SftExample("SA", prompt, [], target))
    return out


def _ub(
    rng: np.random.Generator,
    windows: list[tuple[int, int]],
    train: Sequence[Sequence[int]],
    by_idx: dict[int, dict],
    n: int,
    history: int,
    use_images: bool,
) -> list[SftExample]:
    if not windows:
        return []
    out = []
    for user, pos in _draw(rng, windows, n):
        seq = train[user]
        shown, paths = [], []
        for k, item in enumerate(seq[max(0, pos - history) : pos], start=1):
            line, images = _item_line(by_idx[item], use_images)
            shown.append(f"{k}. {line}")
            paths.extend(images)
        instruction = UB_INSTRUCTIONS[rng.integers(len(UB_INSTRUCTIONS))]
        prompt = "\n".join(shown) + f"\n{instruction}"
        out.append(SftExample("UB", prompt, paths, by_idx[seq[pos]]["title"]))
    return out
