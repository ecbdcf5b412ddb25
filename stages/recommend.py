"""Print the top-K items the trained Molar model recommends for a user or an ad-hoc history.

`molar recommend --user USER_ID` uses everything the dataset knows about that user (the whole
sequence: training items, the validation and the test item), so it answers "what next?" after the
latest interaction. `--history ITEM_ID,ITEM_ID,...` (source item ids, oldest first) scores an
ad-hoc history instead. With eval.mask_history (default) items of the history are never
recommended. Exactly K items are printed, best first: rank, item id, score and title; `--format
json` prints one JSON object for machines.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import typer

from molar.io import MODELS, PROCESSED
from molar.errors import UserError
from molar.gallery import top_k
from stages.common import PARAMS_OPTION, read_params, use_threads, user_errors

MODEL_DIR = MODELS / "molar"


def user_sequence(split, user_id: str) -> list[int]:
    """The user's whole known sequence (test history + test target), as item_idx."""
    try:
        user_idx = split.user_ids.index(user_id)
    except ValueError:
        shown = ", ".join(split.user_ids[:5])
        raise UserError(f"--user: no user {user_id!r} in {PROCESSED}/ (user ids look like: {shown}, ...)") from None
    row = split.test.user_idx.index(user_idx)
    return list(split.test.histories[row]) + [split.test.targets[row]]


def parse_history(text: str, item_ids: Sequence[str]) -> list[int]:
    """``"id1,id2"`` (source item ids) -> item_idx list; unknown ids are an error naming them."""
    index = {item_id: i + 1 for i, item_id in enumerate(item_ids)}
    given = [t.strip() for t in text.split(",") if t.strip()]
    if not given:
        raise UserError("--history: give at least one item id, e.g. --history 12,7,33")
    unknown = [t for t in given if t not in index]
    if unknown:
        raise UserError(f"--history: unknown item id(s) {', '.join(unknown)} (not in the catalog of {PROCESSED}/items.parquet)")
    return [index[t] for t in given]


def main(
    params: Path = PARAMS_OPTION,
    user: str = typer.Option(None, "--user", "-u", help="a user id of the dataset (as in the source data)"),
    history: str = typer.Option(None, "--history", help="comma-separated source item ids, oldest first (instead of --user)"),
    k: int = typer.Option(10, "--k", "-k", help="how many items to recommend"),
    output: str = typer.Option("text", "--format", help="text (a table) or json"),
    model_dir: Path = typer.Option(MODEL_DIR, "--model", help="the trained Molar checkpoint directory"),
) -> None:
    import torch

    from molar.data.split import load_split
    from molar.models.molar import MolarModel

    cfg = read_params(params)
    use_threads(cfg)
    with user_errors():
        if (user is None) == (history is None):
            raise UserError("give exactly one of --user USER_ID or --history ITEM_ID,...")
        if output not in ("text", "json"):
            raise UserError(f"--format must be text or json, got {output!r}")
        split = load_split(PROCESSED)
        item_ids = split.items["item_id"].to_list()
        seq = user_sequence(split, user) if user is not None else parse_history(history, item_ids)
        model = MolarModel.from_pretrained(model_dir)
        if model.config.n_items != split.n_items:
            raise UserError(f"{model_dir} was trained on {model.config.n_items} items, {PROCESSED}/ has {split.n_items}; rerun `dvc repro`")
        with torch.no_grad():
            scores = model.score([seq])[0]
        best = top_k(scores, seq, k, cfg.eval.mask_history)
    titles = split.items["title"].to_list()
    rows = [{"rank": r + 1, "item_id": item_ids[i - 1], "title": titles[i - 1], "score": round(s, 6)} for r, (i, s) in enumerate(best)]
    if output == "json":
        query = {"user": user} if user is not None else {"history": [item_ids[i - 1] for i in seq]}
        typer.echo(json.dumps({**query, "k": k, "mask_history": cfg.eval.mask_history, "items": rows}))
        return
    who = f"user {user}" if user is not None else "the given history"
    typer.echo(f"top {k} for {who} ({len(seq)} items of history):")
    width = max(len(r["item_id"]) for r in rows)
    for r in rows:
        typer.echo(f"{r['rank']:>3}  {r['item_id']:<{width}}  {r['score']:8.4f}  {r['title']}")
