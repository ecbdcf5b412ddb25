"""Catalog-embedding throughput of MIRM: the real code path against a bare forward pass.

    python -m benchmarks.bench_mirm_embed [--backbone tiny-qwen2-vl] [--images] [--n-items N]
        [--batch-size 32] [--threads 2] [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
        [--log FILE]

Items: MovieLens-1M movies (../shared/data/ml-1m/movies.dat, read by the pipeline's movielens
reader: title, genres and year), with the pipeline's ``movielens`` prompt; ``--images`` adds the
posters (``posters/<MovieID>.jpg``) for Qwen2-VL backbones and ``smollm2-135m+mobilenet`` (its
MobileNet features from the default ``mirm.image_encoder``, cached per poster under ~/.cache/molar:
only the first run of a poster pays for the extractor).

- real: ``molar.models.mirm.embed_items`` from item texts to the [n, d] table: chunking by
  estimated length, tokenising, sorting, padding, reading and resizing images, the forward passes
  and the [Cur_Item] gather, all timed (on CPU it prepares each chunk in turn; on an accelerator
  a worker thread prepares chunk k + 1 while the model runs chunk k).
- bare: the same model's forward pass (``model.base_model(**batch)``) over the very batches the
  real path builds, tokenised, padded and image-processed beforehand (untimed).

Both run in the same process, alternating, ``--repeats`` times each. The ratio uses each side's
fastest run (the least disturbed by other processes on a shared machine); medians and the load
average are printed too. Target: real >= 0.8 x bare items/s. Tokens/s count real (unpadded)
tokens. The two tables must agree (printed as max |diff|): the real path is not faster by doing less.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ML1M = Path(__file__).resolve().parents[2] / "shared" / "data" / "ml-1m"
TARGET = 0.8


def ml1m_items(root: Path, images: bool, n_items: int | None):
    """MovieLens-1M movies as a processed-style items table (item_idx 1..n)."""
    import polars as pl

    from molar.config import DataParams
    from molar.data.readers.movielens import read_movies_dat
    from molar.data.schema import IngestReport

    content = read_movies_dat(root / "movies.dat", DataParams(), IngestReport("movielens"))
    rows = []
    for movie_id, c in list(content.items())[:n_items]:
        poster = root / "posters" / f"{movie_id}.jpg"
        rows.append(
            {
                "item_id": movie_id,
                "title": c["title"],
                "description": c["description"],
                "attributes": json.dumps(c["attributes"]),
                "image_path": str(poster) if images and poster.exists() else None,
            }
        )
    return pl.DataFrame(rows).with_row_index("item_idx", offset=1).with_columns(pl.col("item_idx").cast(pl.Int64))


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from molar.backbones import load_backbone, mirm_load_options
    from molar.config import MirmParams
    from molar.models.mirm import backbone_corpus, chunk_batches, embed_items, item_chunks, item_texts, make_encoder

    items = ml1m_items(Path(args.data), args.images, args.n_items)
    modalities = ["text", "image"] if args.images else ["text"]
    mirm = MirmParams(modalities=modalities, embed_batch_size=args.batch_size, dtype=args.dtype)
    backbone = load_backbone(
        args.backbone,
        corpus=backbone_corpus(items),
        modalities=modalities,
        dtype=args.dtype,
        device=args.device,
        **mirm_load_options(mirm),
    )
    encoder = make_encoder(backbone, mirm, "movielens", image_root="/")
    texts = item_texts(items)
    model = backbone.model

    # The bare baseline's input: exactly the batches the real path builds, prepared up front.
    groups, prepared = [], []
    prepare_start = time.perf_counter()
    for chunk in item_chunks(encoder, texts, args.batch_size):
        for idx, batch in chunk_batches(encoder, texts, chunk, args.batch_size):
            groups.append(idx)
            prepared.append({k: v.to(args.device) for k, v in batch.items()})
    prepare_seconds = time.perf_counter() - prepare_start  # serial input preparation, the real path's extra work
    real_tokens = sum(int(b["attention_mask"].sum()) for b in prepared)
    padded_tokens = sum(int(b["input_ids"].numel()) for b in prepared)

    def sync() -> None:
        if str(args.device).startswith("cuda"):
            torch.cuda.synchronize()

    @torch.inference_mode()
    def bare() -> torch.Tensor:
        out = torch.empty(len(texts), backbone.hidden_size)
        for g, batch in zip(groups, prepared):
            inputs = {k: v for k, v in batch.items() if k != "cur_positions"}
            hidden = model.base_model(**inputs, use_cache=False).last_hidden_state
            out[g] = hidden[torch.arange(len(g), device=hidden.device), batch["cur_positions"]].float().cpu()
        return out

    def real() -> torch.Tensor:
        return embed_items(backbone, encoder, texts, args.batch_size)

    def timed(fn):
        sync()
        start = time.perf_counter()
        table = fn()
        sync()
        return time.perf_counter() - start, table

    timed(lambda: embed_items(backbone, encoder, texts[: 2 * args.batch_size], args.batch_size))  # warm-up
    bare_s, real_s = [], []
    for _ in range(args.repeats):
        seconds, bare_table = timed(bare)
        bare_s.append(seconds)
        seconds, real_table = timed(real)
        real_s.append(seconds)
    b, r = min(bare_s), min(real_s)
    n = len(texts)
    return {
        "backbone": args.backbone,
        "modalities": modalities,
        "items": n,
        "with_image": sum(t.image_path is not None for t in texts),
        "device": str(args.device),
        "dtype": args.dtype,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "real_tokens": real_tokens,
        "padding_overhead": round(padded_tokens / real_tokens - 1, 4),
        "bare_items_per_s": round(n / b, 1),
        "real_items_per_s": round(n / r, 1),
        "bare_tokens_per_s": round(real_tokens / b, 1),
        "real_tokens_per_s": round(real_tokens / r, 1),
        "ratio_real_over_bare": round(b / r, 3),
        "ratio_of_medians": round(statistics.median(bare_s) / statistics.median(real_s), 3),
        # the ratio if preparing the input did not overlap the model at all (a floor, timed once)
        "prepare_seconds": round(prepare_seconds, 3),
        "ratio_if_serial": round(b / (b + prepare_seconds), 3),
        "load_average": os.getloadavg(),
        "bare_seconds": [round(s, 3) for s in bare_s],
        "real_seconds": [round(s, 3) for s in real_s],
        "max_abs_diff": float((real_table - bare_table).abs().max()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny-qwen2-vl", help="preset, checkpoint directory or cached hub id")
    parser.add_argument("--data", default=str(ML1M), help="MovieLens-1M folder (movies.dat, posters/)")
    parser.add_argument("--images", action="store_true", help="show the posters (Qwen2-VL backbones, smollm2-135m+mobilenet)")
    parser.add_argument("--n-items", type=int, default=None, help="first N movies only (default: all 3,883)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--log", default=None, help="append the result (one JSON line) to this file")
    args = parser.parse_args(argv)
    result = run(args)
    verdict = "meets" if result["ratio_real_over_bare"] >= TARGET else "BELOW"
    print(
        f"{result['backbone']} {'+'.join(result['modalities'])} {result['items']} items on {result['device']} "
        f"({result['dtype']}, {result['threads']} threads, batch {result['batch_size']}):\n"
        f"  bare {result['bare_items_per_s']:.1f} items/s, {result['bare_tokens_per_s']:.0f} tokens/s\n"
        f"  real {result['real_items_per_s']:.1f} items/s, {result['real_tokens_per_s']:.0f} tokens/s\n"
        f"  real / bare = {result['ratio_real_over_bare']:.3f} best-of-{args.repeats} ({verdict} the {TARGET}x target), "
        f"{result['ratio_of_medians']:.3f} of medians; padding overhead {result['padding_overhead']:.1%}; "
        f"max |diff| {result['max_abs_diff']:.2e}; load average {result['load_average'][0]:.1f}\n"
        f"  input preparation alone {result['prepare_seconds']:.2f}s: even without overlap real / bare >= "
        f"{result['ratio_if_serial']:.3f}",
        flush=True,
    )
    if args.log:
        with open(args.log, "a") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    sys.exit(main())
