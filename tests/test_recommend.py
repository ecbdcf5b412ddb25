"""`molar recommend`: exactly K items, never a history item when masking is on, text and JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
import torch
import typer
from transformers import AutoModel, Qwen2VLTextConfig
from typer.testing import CliRunner

from molar.config import SplitParams
from molar.data.split import build_split
from molar.models.dueg import Dueg
from molar.models.molar import CachedItems, MolarConfig, MolarModel, align_head_for
from stages import recommend

N_ITEMS = 12
ITEM_IDS = [f"m{i}" for i in range(1, N_ITEMS + 1)]
SEQUENCES = {  # user -> source item ids, oldest first
    "u1": ["m1", "m2", "m3", "m4", "m5", "m6"],
    "u2": ["m7", "m8", "m9", "m11"],
    "u3": ["m2", "m4", "m6", "m8", "m10", "m12", "m1"],
}


def make_app() -> typer.Typer:
    app = typer.Typer()
    app.command("recommend")(recommend.main)
    app.command("noop", hidden=True)(lambda: None)  # two commands: typer then routes by name
    return app


def tiny_model(seed: int = 0) -> MolarModel:
    torch.manual_seed(seed)
    config = Qwen2VLTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               num_key_value_heads=2, vocab_size=5, bos_token_id=None, eos_token_id=None,
                               rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    table = torch.randn(N_ITEMS + 1, 16)
    table[0] = 0
    cfg = MolarConfig(n_items=N_ITEMS, item_dim=16, hidden_size=32, id_dim=8, max_length=5)
    decoder = AutoModel.from_config(config, attn_implementation="sdpa")
    return MolarModel(cfg, Dueg(decoder, 16), CachedItems(table), align_head_for(32, 8, project=True)).eval()


@pytest.fixture()
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with a processed split, a trained-looking checkpoint and params."""
    monkeypatch.chdir(tmp_path)
    items = pl.DataFrame(
        {
            "item_id": ITEM_IDS,
            "title": [f"Title {i}" for i in ITEM_IDS],
            "description": [""] * N_ITEMS,
            "attributes": ["{}"] * N_ITEMS,
            "image_path": [None] * N_ITEMS,
        },
        schema_overrides={"image_path": pl.String},
    )
    rows = [(u, it, t, t) for u, seq in SEQUENCES.items() for t, it in enumerate(seq)]
    interactions = pl.DataFrame(rows, schema=["user_id", "item_id", "timestamp", "order"], orient="row")
    tables, _ = build_split(items, interactions, SplitParams())
    processed = tmp_path / "data" / "processed"
    processed.mkdir(parents=True)
    for name, df in tables.items():
        df.write_parquet(processed / f"{name}.parquet")
    tiny_model().save_pretrained(tmp_path / "data" / "models" / "molar")
    (tmp_path / "params.yaml").write_text("eval:\n  mask_history: true\n")
    (tmp_path / "params-nomask.yaml").write_text("eval:\n  mask_history: false\n")
    return tmp_path


def run(*args: str):
    return CliRunner().invoke(make_app(), ["recommend", *args])


@pytest.mark.parametrize("user", list(SEQUENCES))
@pytest.mark.parametrize("k", [1, 3, 5])
def test_user_gets_exactly_k_items_none_from_the_history(repo: Path, user: str, k: int) -> None:
    result = run("--user", user, "--k", str(k), "--format", "json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    ids = [r["item_id"] for r in out["items"]]
    assert len(ids) == k and len(set(ids)) == k
    assert not set(ids) & set(SEQUENCES[user])
    scores = [r["score"] for r in out["items"]]
    assert scores == sorted(scores, reverse=True) and [r["rank"] for r in out["items"]] == list(range(1, k + 1))


def test_k_up_to_every_unseen_item_and_no_further(repo: Path) -> None:
    unseen = N_ITEMS - len(SEQUENCES["u1"])
    result = run("--user", "u1", "--k", str(unseen), "--format", "json")
    assert result.exit_code == 0
    assert {r["item_id"] for r in json.loads(result.output)["items"]} == set(ITEM_IDS) - set(SEQUENCES["u1"])
    too_many = run("--user", "u1", "--k", str(unseen + 1))
    assert too_many.exit_code == 2 and f"between 1 and {unseen}" in too_many.output


def test_adhoc_history_text_output_and_errors(repo: Path) -> None:
    result = run("--history", "m3, m5", "--k", "4")
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].startswith("top 4 for the given history") and len(lines) == 5
    shown = [line.split()[1] for line in lines[1:]]
    assert "m3" not in shown and "m5" not in shown and all(line.split()[-2] == "Title" for line in lines[1:])
    assert "unknown item id(s) nope" in run("--history", "m1,nope").output
    assert run("--user", "nobody").exit_code == 2
    assert "exactly one of" in run("--user", "u1", "--history", "m1").output


def test_mask_history_off_lets_history_items_back(repo: Path) -> None:
    # a score row where the history items are the best: masked -> never returned; unmasked -> first
    scores = torch.arange(N_ITEMS + 1, dtype=torch.float32)  # item 12 best, then 11, ...
    history = [12, 11]
    assert [i for i, _ in recommend.top_k(scores, history, 3, mask_history=True)] == [10, 9, 8]
    assert [i for i, _ in recommend.top_k(scores, history, 3, mask_history=False)] == [12, 11, 10]
    # padding (column 0) never comes back, even when it scores highest
    scores[0] = 100.0
    assert 0 not in [i for i, _ in recommend.top_k(scores, [], N_ITEMS, mask_history=False)]
    result = run("--params", "params-nomask.yaml", "--user", "u1", "--k", str(N_ITEMS), "--format", "json")
    assert result.exit_code == 0 and len(json.loads(result.output)["items"]) == N_ITEMS


def test_checkpoint_round_trip_scores_identically(repo: Path) -> None:
    original = tiny_model()
    loaded = MolarModel.from_pretrained(repo / "data" / "models" / "molar")
    histories = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 11]]
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(histories), original.score(histories))
