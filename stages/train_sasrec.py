"""Train SASRec on the training split, pick the epoch by validation NDCG@10, save data/models/sasrec/.

Resumable: killed at any point and rerun, it continues from data/state/train-sasrec/ (a changed
sasrec.*, seed or data starts fresh). Writes the training curve (metrics/sasrec_train.csv: loss
and validation metrics per epoch, for `dvc plots show`) and a summary (metrics/sasrec_train.json).
"""

from __future__ import annotations

from pathlib import Path

import typer

from molar.io import METRICS, MODELS, PROCESSED, STATE, atomic_path, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, use_threads, user_errors

MODEL_DIR = MODELS / "sasrec"
STATE_DIR = STATE / "train-sasrec"
CURVE = METRICS / "sasrec_train.csv"
SUMMARY = METRICS / "sasrec_train.json"
CURVE_COLUMNS = ("epoch", "loss", "valid_ndcg@10", "valid_recall@10", "lr", "seconds")


def write_curve(history: list[dict], path: Path = CURVE) -> None:
    """One row per epoch; validation columns are empty for epochs that were not validated."""
    rows = [",".join(CURVE_COLUMNS)]
    for record in history:
        cells = []
        for col in CURVE_COLUMNS:
            value = record.get(col)
            cells.append("" if value is None else str(int(value)) if col == "epoch" else f"{value:.6g}")
        rows.append(",".join(cells))
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(rows) + "\n")


def main(params: Path = PARAMS_OPTION) -> None:
    import torch

    from molar.data.split import load_split
    from molar.models.sasrec import train_sasrec
    from molar.train import CHECKPOINT, process_state

    cfg = read_params(params)
    prepare_outputs(MODEL_DIR, STATE_DIR / CHECKPOINT, CURVE, SUMMARY)
    threads = use_threads(cfg)
    with user_errors():
        split = load_split(PROCESSED)
    torch.manual_seed(cfg.seed)
    with user_errors():
        model, result = train_sasrec(
            split.train,
            split.valid.histories,
            split.valid.targets,
            split.n_items,
            cfg.sasrec,
            cfg.seed,
            state_dir=STATE_DIR,
            mask_history=cfg.eval.mask_history,
            eval_chunk_size=cfg.eval.user_chunk_size,
        )
    process = process_state()
    if not process.is_main_process:  # a multi-process run: one process writes the outputs
        process.wait_for_everyone()  # returns once they are written
        return
    model.save_pretrained(MODEL_DIR)
    write_curve(result.history)
    best = next(r for r in result.history if r["epoch"] == result.best_epoch)
    write_json(
        {
            "best_epoch": result.best_epoch,
            "epochs_run": len(result.history),
            "stopped_early": result.stopped_early,
            "steps": result.steps,
            "train_loss": round(best["loss"], 6),
            "valid_ndcg@10": round(result.best_metric, 6),
            "valid_recall@10": round(best["valid_recall@10"], 6),
            "threads": threads,  # results are bit-identical for one thread count only
        },
        SUMMARY,
    )
    typer.echo(
        f"train-sasrec: best epoch {result.best_epoch}/{len(result.history)} "
        f"(valid NDCG@10 {result.best_metric:.4f}, {cfg.sasrec.loss} loss) -> {MODEL_DIR}/"
    )
    process.wait_for_everyone()  # a later stage in the same launch reads the outputs
