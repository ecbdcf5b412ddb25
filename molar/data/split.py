"""Leave-one-out split (DESIGN.md section 3) and its loader.

Per user, chronologically (timestamp, then source order, so ties keep the source order): the last
item is the test target, the second-to-last the validation target, the rest the training
sequence. Optional filtering first: iterative k-core over users and items, then a minimum
sequence length (at least 3, so every user has a non-empty training sequence).

Items are remapped to 1..n_items in catalog order (0 is padding); users to 0..n_users-1 in
order of first appearance in the source. Only items that occur in kept interactions form the
catalog, as is standard for leave-one-out benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from molar.config import SplitParams
from molar.errors import MissingInputError, UserError


@dataclass(frozen=True)
class Targets:
    user_idx: list[int]
    histories: list[list[int]]
    targets: list[int]


@dataclass(frozen=True)
class SplitData:
    items: pl.DataFrame  # item_idx 1..n_items in row order
    user_ids: list[str]
    train: list[list[int]]  # per user_idx
    valid: Targets
    test: Targets

    @property
    def n_items(self) -> int:
        return self.items.height

    @property
    def n_users(self) -> int:
        return len(self.user_ids)


def _chronological(interactions: pl.DataFrame) -> pl.DataFrame:
    first_seen = interactions.with_row_index("_row").group_by("user_id").agg(pl.col("_row").min().alias("_user_rank"))
    return (
        interactions.join(first_seen, on="user_id")
        .sort(["_user_rank", "timestamp", "order"], nulls_last=True, maintain_order=True)
        .drop("_user_rank")
    )


def _k_core(df: pl.DataFrame, k: int) -> pl.DataFrame:
    while True:
        before = df.height
        user_ok = df.group_by("user_id").len().filter(pl.col("len") >= k)["user_id"]
        item_ok = df.group_by("item_id").len().filter(pl.col("len") >= k)["item_id"]
        df = df.filter(pl.col("user_id").is_in(user_ok.implode()) & pl.col("item_id").is_in(item_ok.implode()))
        if df.height == before:
            return df


def build_split(items: pl.DataFrame, interactions: pl.DataFrame, cfg: SplitParams) -> tuple[dict[str, pl.DataFrame], dict]:
    """Return the processed tables {items, train, valid, test} and the split statistics."""
    stats: dict = {"rows_in": interactions.height, "users_in": interactions["user_id"].n_unique(), "rows_dropped": {}}
    df = _chronological(interactions)

    if cfg.k_core > 0:
        kept = _k_core(df, cfg.k_core)
        stats["rows_dropped"][f"k_core_{cfg.k_core}"] = df.height - kept.height
        df = kept
    lengths = df.group_by("user_id").len()
    short = lengths.filter(pl.col("len") < cfg.min_user_length)["user_id"]
    kept = df.filter(~pl.col("user_id").is_in(short.implode()))
    stats["rows_dropped"][f"user_shorter_than_{cfg.min_user_length}"] = df.height - kept.height
    stats["users_dropped_short"] = short.len()
    df = kept
    if df.height == 0:
        raise UserError(
            "split: no user has enough interactions left after filtering "
            f"(split.min_user_length={cfg.min_user_length}, split.k_core={cfg.k_core}); lower them"
        )

    used = set(df["item_id"].unique().to_list())
    catalog = items.filter(pl.col("item_id").is_in(list(used)))
    catalog = catalog.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).alias("item_idx")).select(
        "item_idx", "item_id", "title", "description", "attributes", "image_path"
    )
    df = df.join(catalog.select("item_id", "item_idx"), on="item_id", maintain_order="left")

    seqs = df.group_by("user_id", maintain_order=True).agg(pl.col("item_idx").alias("items"))
    seqs = seqs.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("user_idx"))
    full = pl.col("items")
    train = seqs.select("user_idx", "user_id", full.list.slice(0, full.list.len() - 2).alias("items"))
    valid = seqs.select(
        "user_idx", full.list.slice(0, full.list.len() - 2).alias("history"), full.list.get(-2).alias("target")
    )
    test = seqs.select(
        "user_idx", full.list.slice(0, full.list.len() - 1).alias("history"), full.list.get(-1).alias("target")
    )
    n_users = seqs.height
    stats.update(
        {
            "rows_out": df.height,
            "users": n_users,
            "items": catalog.height,
            "items_without_interactions": items.height - catalog.height,
            "train_interactions": df.height - 2 * n_users,
            "mean_sequence_length": round(df.height / n_users, 3),
            "density": round(df.height / (n_users * catalog.height), 6),
        }
    )
    return {"items": catalog, "train": train, "valid": valid, "test": test}, stats


def _targets(df: pl.DataFrame) -> Targets:
    return Targets(df["user_idx"].to_list(), df["history"].to_list(), df["target"].to_list())


def load_split(processed: Path = Path("data/processed")) -> SplitData:
    """Load the tables ``molar split`` wrote."""
    missing = [n for n in ("items", "train", "valid", "test") if not (processed / f"{n}.parquet").exists()]
    if missing:
        raise MissingInputError(f"{processed}: missing {', '.join(m + '.parquet' for m in missing)}; run `molar split` first")
    items = pl.read_parquet(processed / "items.parquet")
    train = pl.read_parquet(processed / "train.parquet").sort("user_idx")
    return SplitData(
        items=items.sort("item_idx"),
        user_ids=train["user_id"].to_list(),
        train=train["items"].to_list(),
        valid=_targets(pl.read_parquet(processed / "valid.parquet").sort("user_idx")),
        test=_targets(pl.read_parquet(processed / "test.parquet").sort("user_idx")),
    )
