"""Train Molar: DUEG over MIRM item embeddings, with BCE + align.alpha x InfoNCE post-alignment to an ID model.

dueg.kind chooses the user model: llm (the backbone's decoder, the paper's DUEG) or an ID model of
the registry (a fresh encoder of that model from its params section; the LLM backbone is then not
loaded for DUEG).

Reads the split, MIRM (data/models/mirm/ and its catalog cache data/models/mirm-items.safetensors)
and the frozen ID model align.id_model (data/models/<align.id_model>/, e.g. SASRec).
train.mirm_trainable: false (default) trains DUEG on the cached item embeddings; true
back-propagates into MIRM for the items of each batch. Selects the
epoch by validation NDCG@10 and saves data/models/molar/ (what `molar evaluate` and `molar
recommend` load). Resumable: killed and rerun, it continues from data/state/train-molar/ (changed
params, data or upstream models start fresh). Curves for `dvc plots show`:
metrics/molar_train/epochs.csv and metrics/molar_train/steps.csv (both loss terms, embedding
spreads, live negatives per step); summary in metrics/molar_train/summary.json.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import typer

from molar.errors import MissingInputError, UserError
from molar.io import METRICS, MODELS, PROCESSED, STATE, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, use_threads, user_errors

MODEL_DIR = MODELS / "molar"
STATE_DIR = STATE / "train-molar"
CURVES = METRICS / "molar_train"
EPOCHS_CSV, STEPS_CSV, SUMMARY = CURVES / "epochs.csv", CURVES / "steps.csv", CURVES / "summary.json"
EPOCH_COLUMNS = ("epoch", "loss", "bce", "sampled_ce", "ce", "align", "id_loss", "user_std", "item_std", "live_negatives",
                 "valid_ndcg@10", "valid_recall@10", "lr", "seconds")


def epoch_rows(history: list[dict]) -> list[dict]:
    used = [c for c in EPOCH_COLUMNS if any(c in r for r in history)]
    return [{c: (int(r[c]) if c == "epoch" else f"{r[c]:.6g}") if c in r else "" for c in used} for r in history]


def main(params: Path = PARAMS_OPTION) -> None:
    import polars as pl
    import torch

    from molar.backbones import load_backbone, mirm_load_options
    from molar.data.split import load_split
    from molar.embed_cache import cached_catalog_embeddings, checkpoint_key
    from molar.models import molar as M
    from molar.models.dueg import decoder_of, user_embedding_of
    from molar.models.mirm import ItemEmbedder, backbone_corpus, catalog_embedder, make_encoder
    from molar.models.registry import load_id_model
    from molar.recipes import molar as recipe
    from molar.train import CHECKPOINT, process_state, run_defining, run_key as make_run_key, sequences_fingerprint
    from stages.train_mirm import ITEM_EMBEDDINGS, MIRM_DIR

    cfg = read_params(params)
    prepare_outputs(MODEL_DIR, STATE_DIR / CHECKPOINT, EPOCHS_CSV, STEPS_CSV, SUMMARY)
    threads = use_threads(cfg)
    started = time.perf_counter()
    torch.manual_seed(cfg.seed)
    t, mirm = cfg.train, cfg.mirm
    with user_errors():
        split = load_split(PROCESSED)
        items = pl.read_parquet(PROCESSED / "items.parquet").sort("item_idx")
        id_dir = MODELS / cfg.align.id_model
        id_model = load_id_model(id_dir)
        if not (MIRM_DIR / "config.json").exists():
            raise MissingInputError(f"{MIRM_DIR}: no MIRM checkpoint; run `molar train-mirm` first")
        load = dict(modalities=mirm.modalities, **mirm_load_options(mirm))
        # end to end, MIRM trains in float32 master weights (mixed precision comes from the loop)
        mirm_bb = load_backbone(MIRM_DIR, dtype="float32" if t.mirm_trainable else mirm.dtype, **load)
        encoder = make_encoder(mirm_bb, mirm, cfg.data.source)
        table = cached_catalog_embeddings(ITEM_EMBEDDINGS, mirm_bb, encoder, items, mirm.embed_batch_size, mirm.dtype)
        if table.shape[0] != split.n_items + 1:
            raise UserError(f"{ITEM_EMBEDDINGS}: {table.shape[0] - 1} items, the split has {split.n_items}; rerun `dvc repro`")

        llm_user_model = cfg.dueg.kind == "llm"
        decoder = user_embedding = dueg_key = None  # other kinds: an ID model's fresh encoder, no decoder
        encoder_section = None if llm_user_model else cfg.section_dict(cfg.dueg.kind)  # defines that encoder
        if llm_user_model:
            # DUEG: the decoder of the base backbone or of the fine-tuned MIRM, a copy of its own
            if cfg.dueg.init == "base":
                source = load_backbone(mirm.backbone, corpus=backbone_corpus(items), dtype="float32", **load)
            else:
                source = mirm_bb
            decoder = decoder_of(source.model)
            user_embedding = user_embedding_of(source.model, source.tokenizer)
            if cfg.dueg.init == "mirm" and t.mirm_trainable:
                decoder = copy.deepcopy(decoder)  # MIRM keeps training its own weights
            decoder = decoder.float()
            dueg_key = checkpoint_key(source.directory)
        mirm_key = checkpoint_key(MIRM_DIR) if t.mirm_trainable else None

        if t.mirm_trainable:
            embed = catalog_embedder(encoder, items)
            item_side: torch.nn.Module = M.MirmItems(ItemEmbedder(mirm_bb.model), embed, table, mirm.embed_batch_size)
        else:
            item_side = M.CachedItems(table)
            del mirm_bb  # only the table is needed from here on
        if llm_user_model and cfg.dueg.init == "base":
            del source

        model = M.build_model(decoder, item_side, cfg, id_dim=int(id_model.item_embeddings().shape[1]), user_embedding=user_embedding)
        run_key = make_run_key(
            "molar", run_defining(cfg.section_dict("train")), cfg.section_dict("align"), cfg.section_dict("dueg"), encoder_section,
            cfg.seed, cfg.eval.mask_history, make_run_key(table), dueg_key, mirm_key, checkpoint_key(id_dir),
            sequences_fingerprint(split.train), sequences_fingerprint(split.valid.histories), split.valid.targets,
        )

        def on_epoch_end(epoch: int, record: dict) -> None:
            if process_state().is_main_process:
                M.rows_to_csv(epoch_rows(result_history + [record]), EPOCHS_CSV)
            result_history.append(record)

        result_history: list[dict] = []
        # a CollapseError (a UserError: these params collapsed the embeddings) ends here with its advice
        result, step_log = recipe.train_molar(
            model, split.train, split.valid.histories, split.valid.targets, cfg, id_model,
            state_dir=STATE_DIR, run_key=run_key, mask_history=cfg.eval.mask_history,
            eval_chunk_size=cfg.eval.user_chunk_size, on_epoch_end=on_epoch_end,
        )

    if step_log is None:  # not the main process of a multi-process run: it writes nothing
        process_state().wait_for_everyone()  # returns once the main process has written the outputs
        return
    extra = {"mirm_trainable": t.mirm_trainable, "dueg_init": cfg.dueg.init if llm_user_model else None,
             "backbone": mirm.backbone, "run_key": run_key}
    model.save_pretrained(MODEL_DIR, extra=extra)
    if cfg.align.train_id_model:
        model.id_model.save_pretrained(MODEL_DIR / "id_model")  # the co-trained ID model, beside DUEG
    M.rows_to_csv(epoch_rows(result.history), EPOCHS_CSV)
    M.rows_to_csv(step_log.rows(), STEPS_CSV)
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    trained_sequences = sum(1 for s in split.train if len(s) >= 2) * len(result.history)
    summary = {
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "steps": result.steps,
        "resumed": result.resumed,
        "train_loss": round(best["loss"], 6),
        "train_bce": round(next((best[k] for k in ("bce", "sampled_ce", "ce") if k in best), float("nan")), 6),  # the recommendation term, whichever train.loss
        "train_align": round(best["align"], 6) if "align" in best else None,
        "valid_ndcg@10": round(result.best_metric, 6),
        "valid_recall@10": round(best["valid_recall@10"], 6),
        "train_seconds": round(sum(r["seconds"] for r in result.history), 2),
        "threads": threads,  # results are bit-identical for one thread count only
        "mixed_precision": result.mixed_precision,  # as trained (train.mixed_precision auto resolved)
    }
    if not result.resumed:  # a replayed or partly replayed run has no honest throughput
        # training sequences per second of training (validation and checkpoints not counted)
        summary["sequences_per_second"] = round(trained_sequences / max(summary["train_seconds"], 1e-9), 2)
    summary["stage_seconds"] = round(time.perf_counter() - started, 1)
    write_json(summary, SUMMARY)
    typer.echo(
        f"train-molar: best epoch {result.best_epoch}/{len(result.history)} (valid NDCG@10 {result.best_metric:.4f}, "
        f"alpha {cfg.align.alpha}, user model {cfg.dueg.kind}, {'end-to-end' if t.mirm_trainable else 'cached items'}) -> {MODEL_DIR}/"
    )
    process_state().wait_for_everyone()  # a later stage in the same launch reads the outputs
