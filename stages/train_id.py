"""Train the ID model --model NAME (sasrec, ...) on the training split, pick the epoch by validation NDCG@10, save data/models/NAME/.

Any model of molar/models/registry.py, built from its params section (NAME.*, or the section
registry.SECTIONS names: sasrec_content.* for the content SASRecs, which also read
data/models/item-content.safetensors) and trained by the next-item recipe
(molar/recipes/id_models.py). Resumable: killed at any point and rerun, it continues from
data/state/train-NAME/ (a changed section, seed, data or item content starts fresh). Writes the
training curve (metrics/NAME_train.csv: loss and validation metrics per epoch, for `dvc plots
show`) and a summary (metrics/NAME_train.json).
"""

from __future__ import annotations

from pathlib import Path

import typer

from molar.io import METRICS, MODELS, PROCESSED, STATE, atomic_path, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, use_threads, user_errors

CURVE_COLUMNS = ("epoch", "loss", "valid_ndcg@10", "valid_recall@10", "lr", "seconds")


def outputs(name: str) -> tuple[Path, Path, Path, Path]:
    """(model folder, resumable state folder, curve, summary) of ID model ``name``."""
    return MODELS / name, STATE / f"train-{name}", METRICS / f"{name}_train.csv", METRICS / f"{name}_train.json"


def write_curve(history: list[dict], path: Path) -> None:
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


MODEL_OPTION = typer.Option(..., "--model", help="the ID model to train (a name of molar/models/registry.py, e.g. sasrec)")


def main(params: Path = PARAMS_OPTION, model: str = MODEL_OPTION) -> None:
    import torch

    from molar.data.split import load_split
    from molar.models.registry import id_model_class, id_model_section
    from molar.recipes.id_models import train_id_model
    from molar.train import CHECKPOINT, process_state

    cfg = read_params(params)
    with user_errors():
        id_model_class(model)  # an unknown name fails before any output is touched
    model_dir, state_dir, curve, summary = outputs(model)
    prepare_outputs(model_dir, state_dir / CHECKPOINT, curve, summary)
    section = id_model_section(cfg, model)
    threads = use_threads(cfg)
    with user_errors():
        split = load_split(PROCESSED)
    torch.manual_seed(cfg.seed)
    with user_errors():
        trained, result = train_id_model(
            model,
            section,
            split.train,
            split.valid.histories,
            split.valid.targets,
            split.n_items,
            cfg.seed,
            state_dir=state_dir,
            mask_history=cfg.eval.mask_history,
            eval_chunk_size=cfg.eval.user_chunk_size,
        )
    process = process_state()
    if not process.is_main_process:  # a multi-process run: one process writes the outputs
        process.wait_for_everyone()  # returns once they are written
        return
    trained.save_pretrained(model_dir)
    write_curve(result.history, curve)
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
        summary,
    )
    typer.echo(
        f"train-id {model}: best epoch {result.best_epoch}/{len(result.history)} "
        f"(valid NDCG@10 {result.best_metric:.4f}, {section.loss} loss) -> {model_dir}/"
    )
    process.wait_for_everyone()  # a later stage in the same launch reads the outputs
