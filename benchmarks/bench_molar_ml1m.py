"""Molar on MovieLens-1M: does post-alignment help? Molar (alpha = 0 and > 0) beside SASRec-CE.

    python -m benchmarks.bench_molar_ml1m [--params params-ml1m.yaml] [--alphas 0,0.1,0.5]
        [--dueg-layers 2] [--epochs 4] [--threads 2] [--skip-quality] [--skip-throughput]

Quality (test split, full catalog, history masked), everything in this one run:
- data: ../shared/data/ml-1m through the pipeline's ingest (``sasrec-txt`` reader) and split;
- SASRec-CE: ``train_id_model("sasrec", ...)`` with the preset's sasrec section (overrides below); it is also the
  frozen ID model Molar aligns to;
- MIRM: ``smollm2-135m`` (text: the ``movielens`` prompt, title + year + genres), not fine-tuned,
  its ``[Cur_Item]`` states cached for the catalog (``molar.embed_cache``);
- Molar: DUEG over the cached item embeddings, trained with ``L_bce + alpha * L_align`` for each
  alpha of ``--alphas``; the "best" alpha > 0 is picked by validation NDCG@10, never by test.
  DUEG keeps the first ``--dueg-layers`` blocks of SmolLM2's decoder (``dueg.layers``): a
  full-depth (30-block) DUEG trains at well under 1 sequence/s on 2 shared CPU cores, i.e. hours
  per epoch; the throughput of the full depth is measured and printed too.
Ratios are against SASRec-CE of the same run; popularity is printed as the floor.

Throughput (``--skip-quality`` runs it alone): training sequences/s of train-molar in both modes (cached
item embeddings vs end to end through MIRM), on ML-1M (median of a few optimizer steps on real batches of
8 users: the 2-block DUEG over cached items, the same end to end with SmolLM2 trained on the items' prompts,
and a full-depth DUEG over cached items) and on the embedded default (tiny-qwen2-vl, one whole epoch of
the train-molar stage in a scratch copy of the pipeline).

Every phase stores its result under benchmarks/out/molar_ml1m/ (``--out``) and is skipped when
rerun; training is resumable (molar.train.fit state per phase). Delete the folder to start over.
A variant (``--loss sampled_ce --negatives 256 --epochs 8 --out ...``) can reuse the SASRec and
item-embedding phases by copying ``sasrec/`` and ``items.safetensors`` into its ``--out`` first.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

OUT = Path("benchmarks/out/molar_ml1m")
ANCHORS = {  # DESIGN.md section 5
    "SASRec+ full CE (Klenitskiy & Vasilev 2023)": (0.182, 0.315),
    "HLLM (as reported by the Molar paper)": (0.165, 0.292),
    "Molar (claimed)": (0.177, 0.312),
}
# What this benchmark changes in the preset (printed with the results).
SASREC_OVERRIDES = {"max_length": 50, "epochs": 30, "patience": 3}
TRAIN_OVERRIDES = {"max_length": 20, "batch_size": 32, "lr": 3e-4, "warmup_ratio": 0.05, "patience": 2, "checkpoint_every": 50}
MIRM_OVERRIDES = {"backbone": "smollm2-135m", "modalities": ["text"], "finetune": "none", "embed_batch_size": 32}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cached_json(path: Path, compute, key: str = ""):
    """The JSON at ``path`` if it was computed under ``key``, else ``compute()`` written there with
    the key (phases survive a rerun; a phase whose params changed is recomputed, not reused)."""
    if path.exists():
        value = json.loads(path.read_text())
        if value.get("key", "") == key:
            return value
        log(f"{path}: computed under another key ({value.get('key')!r} != {key!r}); recomputing")
    value = {**compute(), "key": key}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
    return value


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------- quality
def bench_params(path: Path, epochs: int, layers: int):
    from molar.config import load_params

    p = load_params(path)
    return p.model_copy(
        update={
            "sasrec": p.sasrec.model_copy(update=SASREC_OVERRIDES),
            "mirm": p.mirm.model_copy(update=MIRM_OVERRIDES),
            "train": p.train.model_copy(update={**TRAIN_OVERRIDES, "epochs": epochs}),
            "dueg": p.dueg.model_copy(update={"layers": layers}),
        }
    )


def load_data(params, max_users: int | None = None):
    import polars as pl

    from molar.data.ingest import ingest
    from molar.data.split import build_split

    with tempfile.TemporaryDirectory() as tmp:
        items, interactions, _ = ingest(params, Path(tmp), Path(tmp))
    if max_users:  # a smoke run on the first users only
        users = interactions["user_id"].unique(maintain_order=True).head(max_users)
        interactions = interactions.filter(pl.col("user_id").is_in(users.implode()))
    tables, stats = build_split(items, interactions, params.split)
    return tables, stats


def test_metrics(score_fn, tables, n_items, params) -> dict:
    from molar.evaluate import evaluate_scorer

    test = tables["test"].sort("user_idx")
    return evaluate_scorer(
        score_fn, test["history"].to_list(), test["target"].to_list(), n_items,
        ks=(10, 20), mask_history=params.eval.mask_history, chunk_size=params.eval.user_chunk_size, progress=False,
    )


def run_sasrec(params, tables, n_items):
    from molar.models.sasrec import SASRec
    from molar.recipes.id_models import load_scorer, train_id_model
    from molar.train import run_defining, run_key

    model_dir = OUT / "sasrec" / "model"

    def compute():
        train = tables["train"].sort("user_idx")["items"].to_list()
        valid = tables["valid"].sort("user_idx")
        model, result = train_id_model(
            "sasrec", params.sasrec, train, valid["history"].to_list(), valid["target"].to_list(), n_items, params.seed,
            state_dir=OUT / "sasrec" / "state", mask_history=params.eval.mask_history,
            eval_chunk_size=params.eval.user_chunk_size, desc="sasrec-ce",
        )
        model.save_pretrained(model_dir)
        seconds = [r["seconds"] for r in result.history]
        return {
            "test": test_metrics(load_scorer(model), tables, n_items, params),
            "best_valid_ndcg@10": result.best_metric, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "seconds_per_epoch": sum(seconds) / len(seconds), "resumed": result.resumed,
            "params": params.sasrec.model_dump(mode="json"),
        }

    key = run_key("bench-sasrec", run_defining(params.sasrec.model_dump(mode="json")), params.seed, n_items)
    record = cached_json(OUT / "sasrec" / "result.json", compute, key)
    return SASRec.from_pretrained(model_dir), record


def item_table(params, tables):
    from molar.backbones import load_backbone
    from molar.embed_cache import cached_catalog_embeddings
    from molar.models.mirm import make_encoder

    items = tables["items"].sort("item_idx")
    backbone = load_backbone(params.mirm.backbone, modalities=params.mirm.modalities, dtype="float32")
    encoder = make_encoder(backbone, params.mirm, "movielens")
    started = time.perf_counter()
    table = cached_catalog_embeddings(OUT / "items.safetensors", backbone, encoder, items, params.mirm.embed_batch_size, "float32")
    return backbone, table, time.perf_counter() - started


def run_molar(params, alpha: float, tables, n_items, backbone, table, sasrec, sasrec_key: str) -> dict:
    import copy

    from molar.models import molar as M
    from molar.models.dueg import decoder_of, user_embedding_of
    from molar.recipes import molar as recipe
    from molar.train import run_defining, run_key

    out = OUT / f"molar-alpha{alpha:g}"
    p = params.model_copy(update={"align": params.align.model_copy(update={"alpha": alpha})})
    key = run_key("bench-molar-ml1m", run_defining(p.section_dict("train")), p.section_dict("align"), p.section_dict("dueg"),
                  p.seed, run_key(table), n_items, sasrec_key)

    def compute():
        decoder = copy.deepcopy(decoder_of(backbone.model)).float()
        model = M.build_model(decoder, M.CachedItems(table), p, id_dim=int(sasrec.config.hidden_size),
                              user_embedding=user_embedding_of(backbone.model, backbone.tokenizer))
        train = tables["train"].sort("user_idx")["items"].to_list()
        valid = tables["valid"].sort("user_idx")
        started = time.perf_counter()
        result, step_log = recipe.train_molar(
            model, train, valid["history"].to_list(), valid["target"].to_list(), p, sasrec,
            state_dir=out / "state", run_key=key, mask_history=p.eval.mask_history,
            eval_chunk_size=256, desc=f"molar-a{alpha:g}",
        )
        wall = time.perf_counter() - started
        M.rows_to_csv(step_log.rows(), out / "steps.csv")
        seconds = [r["seconds"] for r in result.history]
        sequences = sum(1 for s in train if len(s) >= 2)
        return {
            "alpha": alpha,
            "test": test_metrics(recipe.load_scorer(model), tables, n_items, p),
            "best_valid_ndcg@10": result.best_metric, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
            "seconds_per_epoch": sum(seconds) / len(seconds), "train_sequences_per_s": sequences / (sum(seconds) / len(seconds)),
            "history": result.history, "resumed": result.resumed, "wall_seconds": wall, "peak_rss_mib": peak_mib(),
        }

    return cached_json(out / "result.json", compute, key)


def train_step_seconds(model, params, tables, batch: int, steps: int) -> float:
    """Median seconds of one optimizer step of the train-molar objective (``params.train``'s loss and
    positions, MIRM at ``train.mirm_lr`` end to end, under bf16 autocast when ``train.mixed_precision`` is
    bf16, as the stage's accelerate loop runs it) on the first real ML-1M batches, the first (warm-up)
    step left out. Alignment is off: it adds one forward pass of the small ID model."""
    import torch

    from molar.models import molar as M
    from molar.recipes.id_models import NextItemBatches
    from molar.recipes.molar import checkpoint_activations, param_groups

    t = params.train
    if t.gradient_checkpointing:
        checkpoint_activations(model)
    objective = M.MolarObjective(
        M.ObjectiveSettings(n_items=model.config.n_items, loss=t.loss, num_negatives=t.num_negatives,
                            all_positions=t.all_positions, alpha=0.0),
        id_model=None,
    )
    optimizer = torch.optim.AdamW(param_groups(model, t) or model.parameters(), lr=t.lr)
    pairs = NextItemBatches(tables["train"].sort("user_idx")["items"].to_list(), t.max_length, batch, params.seed)
    model.train()
    times = []
    for i, (inputs, targets) in enumerate(pairs(0)):
        if i == steps + 1:
            break
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=t.mixed_precision == "bf16"):
            loss, _ = objective(model, {"inputs": inputs, "targets": targets, "step": i})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - started)
        log(f"  step {i}: {times[-1]:.1f}s")
    return sorted(times[1:])[len(times[1:]) // 2]


def ml1m_throughput(backbone, table, params, tables, batch: int = 8) -> dict:
    """Training sequences/s of train-molar on real ML-1M batches of ``batch`` users (``train.max_length``
    items each): DUEG of ``dueg.layers`` blocks over cached items, the same DUEG end to end (MIRM, SmolLM2
    on the items' prompts, trained with it: ``train.mirm_trainable: true``), and a full-depth DUEG over
    cached items; and the cached DUEG under bf16 autocast (``train.mixed_precision: bf16``). A few steps
    each: an end-to-end epoch on ML-1M takes days on CPUs."""
    import copy

    from molar.models import molar as M
    from molar.models.dueg import decoder_of
    from molar.models.mirm import ItemEmbedder, catalog_embedder, make_encoder
    from molar.train import run_defining, run_key

    def measure(layers: int, end_to_end: bool, steps: int, mixed_precision: str = "no") -> dict:
        # end to end, MIRM's activations for every item of a step (up to batch x max_length inputs and
        # positives plus the negatives) outgrow the machine's memory unless its layers recompute them
        train = {"gradient_checkpointing": end_to_end, "mixed_precision": mixed_precision}
        p = params.model_copy(update={"dueg": params.dueg.model_copy(update={"layers": layers}),
                                      "train": params.train.model_copy(update=train)})
        if end_to_end:
            embed = catalog_embedder(make_encoder(backbone, p.mirm, "movielens"), tables["items"].sort("item_idx"))
            items = M.MirmItems(ItemEmbedder(copy.deepcopy(backbone.model)), embed, table, p.mirm.embed_batch_size)
        else:
            items = M.CachedItems(table)
        model = M.build_model(copy.deepcopy(decoder_of(backbone.model)).float(), items, p, id_dim=None)
        seconds = train_step_seconds(model, p, tables, batch, steps)
        return {"layers": len(model.dueg.decoder.layers), "gradient_checkpointing": end_to_end, "mixed_precision": mixed_precision,
                "seconds_per_step": seconds, "sequences_per_s": batch / seconds}

    def compute():
        started = time.perf_counter()
        record = {"batch": batch, "max_length": params.train.max_length, "loss": params.train.loss}
        for name, layers, end_to_end, steps, mixed in (("cached", params.dueg.layers, False, 20, "no"),
                                                        ("cached_bf16", params.dueg.layers, False, 20, "bf16"),
                                                        ("full_depth_cached", 0, False, 4, "no"),
                                                        ("end_to_end", params.dueg.layers, True, 2, "no")):
            log(f"throughput on ML-1M: {name}")
            record[name] = measure(layers, end_to_end, steps, mixed)
        record["seconds"] = time.perf_counter() - started
        record["peak_rss_mib"] = peak_mib()
        return record

    key = run_key("bench-molar-ml1m-throughput-bf16", batch, run_defining(params.section_dict("train")), params.section_dict("dueg"), run_key(table))
    return cached_json(OUT / "ml1m_throughput.json", compute, key)


# ---------------------------------------------------------------------------- throughput
THROUGHPUT_PARAMS = """\
threads: {threads}
train:
  epochs: 1
  mirm_trainable: {trainable}
mirm:
  finetune: none
sasrec:
  epochs: 2
"""


def embedded_default_throughput() -> dict:
    """Sequences/s of train-molar (one epoch) on the embedded default, cached vs end-to-end."""
    import os

    def compute():
        import torch

        from stages import ingest, split, train_id, train_mirm, train_molar

        threads = torch.get_num_threads()  # --threads: the stages pin torch to the threads param

        here = Path.cwd()
        records = {}
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            try:
                params = Path(tmp) / "params.yaml"
                params.write_text(THROUGHPUT_PARAMS.format(threads=threads, trainable="false"))
                for stage in (ingest, split, train_mirm):
                    stage.main(params)
                train_id.main(params, model="sasrec")
                for trainable in ("false", "true"):
                    params.write_text(THROUGHPUT_PARAMS.format(threads=threads, trainable=trainable))
                    train_molar.main(params)
                    summary = json.loads(Path("metrics/molar_train/summary.json").read_text())
                    records["end_to_end" if trainable == "true" else "cached"] = {
                        "sequences_per_s": summary["sequences_per_second"], "train_seconds": summary["train_seconds"],
                    }
            finally:
                os.chdir(here)
        return records

    return cached_json(OUT / "embedded_default_throughput.json", compute)


# --------------------------------------------------------------------------------- report
def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")  # a smoke run can score 0


def fmt(m: dict, base: dict | None) -> str:
    cells = f"{m['ndcg@10']:>8.4f}{m['recall@10']:>8.4f}{m['ndcg@20']:>8.4f}{m['recall@20']:>8.4f}"
    if base:
        cells += f"{ratio(m['ndcg@10'], base['ndcg@10']):>8.2f}{ratio(m['recall@10'], base['recall@10']):>8.2f}"
    return cells


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=Path("params-ml1m.yaml"))
    ap.add_argument("--alphas", default="0,0.1,0.5", help="align.alpha values; 0 is the paper's w/o CL row")
    ap.add_argument("--dueg-layers", type=int, default=2, help="DUEG keeps this many of SmolLM2's 30 blocks (0 = all)")
    ap.add_argument("--epochs", type=int, default=4, help="most Molar epochs (early stopping on valid NDCG@10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--max-users", type=int, help="smoke run: only the first N users (results are not comparable)")
    ap.add_argument("--out", type=Path, default=OUT, help="where phase results and training state live")
    ap.add_argument("--sasrec-epochs", type=int, default=SASREC_OVERRIDES["epochs"])
    ap.add_argument("--loss", default="bce", help="train.loss: bce (paper, 1:1), sampled_ce or ce (full softmax)")
    ap.add_argument("--negatives", type=int, default=1, help="train.num_negatives")
    ap.add_argument("--lr", type=float, default=TRAIN_OVERRIDES["lr"], help="train.lr")
    ap.add_argument("--max-length", type=int, default=TRAIN_OVERRIDES["max_length"], help="train.max_length: history items DUEG reads")
    ap.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="train.mixed_precision of the Molar runs (bf16: 2-3x on CPUs with AVX512-BF16)")
    args = ap.parse_args()
    OUT = args.out
    SASREC_OVERRIDES["epochs"] = args.sasrec_epochs
    TRAIN_OVERRIDES.update(loss=args.loss, num_negatives=args.negatives, lr=args.lr, max_length=args.max_length,
                           mixed_precision=args.mixed_precision)

    import torch

    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    alphas = [float(a) for a in args.alphas.split(",")]
    report: dict = {"args": vars(args) | {"params": str(args.params)}}

    if not (args.skip_quality and args.skip_throughput):  # both read ML-1M and its item table
        params = bench_params(args.params, args.epochs, args.dueg_layers)
        tables, stats = load_data(params, args.max_users)
        n_items = tables["items"].height
        log(f"data: {stats['users']:,} users, {n_items:,} items, {stats['rows_out']:,} interactions")
        backbone, table, embed_seconds = item_table(params, tables)
        report["items"] = {"n": table.shape[0] - 1, "dim": table.shape[1], "seconds": round(embed_seconds, 1)}
        log(f"item embeddings: {table.shape[0] - 1} x {table.shape[1]} in {embed_seconds:.0f}s (cached when ~0)")
    if not args.skip_quality:
        from molar.models.popularity import Popularity

        train = tables["train"].sort("user_idx")["items"].to_list()
        report["popularity"] = test_metrics(Popularity.fit(train, n_items).score, tables, n_items, params)
        log(f"popularity: {report['popularity']}")
        sasrec, report["sasrec"] = run_sasrec(params, tables, n_items)
        log(f"sasrec-ce: {report['sasrec']['test']}")
        report["molar"] = {}
        for alpha in alphas:
            report["molar"][alpha] = run_molar(params, alpha, tables, n_items, backbone, table, sasrec, report["sasrec"]["key"])
            log(f"molar alpha={alpha:g}: {report['molar'][alpha]['test']}")
    if not args.skip_throughput:
        report["ml1m_throughput"] = ml1m_throughput(backbone, table, params, tables)
        log(f"ML-1M throughput: {report['ml1m_throughput']}")
        report["throughput"] = embedded_default_throughput()
        log(f"embedded default throughput: {report['throughput']}")
    (OUT / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")

    print(f"\nMolar on ML-1M, test split (full catalog, history masked), {args.threads} CPU threads shared with other jobs")
    if "molar" in report:
        base = report["sasrec"]["test"]
        sasrec_used = {k: report["sasrec"].get("params", {}).get(k) for k in SASREC_OVERRIDES}
        print(f"overrides: sasrec {sasrec_used} (the run measured); train {TRAIN_OVERRIDES} epochs<={args.epochs}; "
              f"mirm {MIRM_OVERRIDES}; dueg.layers {args.dueg_layers}\n")
        print(f"{'model':<26}{'N@10':>8}{'R@10':>8}{'N@20':>8}{'R@20':>8}{'xN@10':>8}{'xR@10':>8}  valid N@10  epochs")
        print(f"{'popularity':<26}{fmt(report['popularity'], base)}")
        s = report["sasrec"]
        print(f"{'SASRec-CE (baseline)':<26}{fmt(s['test'], base)}  {s['best_valid_ndcg@10']:>10.4f}  {s['best_epoch']}/{s['epochs_run']}")
        positive = {a: r for a, r in report["molar"].items() if a > 0}
        best = max(positive, key=lambda a: positive[a]["best_valid_ndcg@10"]) if positive else None
        for alpha, r in report["molar"].items():
            tag = " (w/o CL)" if alpha == 0 else " (best by valid)" if alpha == best else ""
            print(f"{('Molar a=' + format(alpha, 'g') + tag):<26}{fmt(r['test'], base)}  {r['best_valid_ndcg@10']:>10.4f}  "
                  f"{r['best_epoch']}/{r['epochs_run']}  ({r['seconds_per_epoch'] / 60:.1f} min/epoch)")
        if best is not None and 0.0 in report["molar"]:
            gain = ratio(report["molar"][best]["test"]["ndcg@10"], report["molar"][0.0]["test"]["ndcg@10"])
            print(f"\npost-alignment (alpha={best:g} vs 0): test N@10 x{gain:.2f}")
        print(f"DUEG training throughput on ML-1M (batch {TRAIN_OVERRIDES['batch_size']}, {TRAIN_OVERRIDES['max_length']} items): "
              + ", ".join(f"a={a:g}: {r['train_sequences_per_s']:.1f} seq/s" for a, r in report["molar"].items()))
        print(f"item embeddings: {report['items']}")
        print("\nanchors from the literature (their ML-1M file has 1-2 more items per user):")
        for name, (n10, r10) in ANCHORS.items():
            print(f"  {name:<46} N@10 {n10:.3f}  R@10 {r10:.3f}")
    if "ml1m_throughput" in report:
        t = report["ml1m_throughput"]
        cached = t["cached"]["sequences_per_s"]
        print(f"\ntrain-molar steps on ML-1M (batch {t['batch']}, {t['max_length']} items, loss {t['loss']}; median step): "
              f"cached items, {t['cached']['layers']}-block DUEG {cached:.1f} seq/s"
              + (f", under bf16 autocast {t['cached_bf16']['sequences_per_s']:.1f} seq/s (x{t['cached_bf16']['sequences_per_s'] / cached:.2f})"
                 if "cached_bf16" in t else "")
              + f"; end to end through MIRM "
              f"{t['end_to_end']['sequences_per_s']:.3f} seq/s (x{t['end_to_end']['sequences_per_s'] / cached:.4f} of cached); "
              f"full depth ({t['full_depth_cached']['layers']} blocks), cached items {t['full_depth_cached']['sequences_per_s']:.2f} seq/s "
              f"(x{t['full_depth_cached']['sequences_per_s'] / cached:.3f}); peak RSS {t['peak_rss_mib']:.0f} MiB")
    if "throughput" in report:
        t = report["throughput"]
        end_to_end_share = t["end_to_end"]["sequences_per_s"] / t["cached"]["sequences_per_s"]
        print(f"\nembedded default (tiny-qwen2-vl), one train-molar epoch: cached items {t['cached']['sequences_per_s']:.1f} seq/s, "
              f"end-to-end through MIRM {t['end_to_end']['sequences_per_s']:.2f} seq/s (x{end_to_end_share:.3f} of cached)")


if __name__ == "__main__":
    main()
