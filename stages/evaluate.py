"""Evaluate one model (--model NAME) or merge the models of eval.models (--merge) into metrics/.

`--model NAME` ranks the full catalog for every validation and test user, with the user's
history masked (eval.mask_history), and writes NDCG@K / Recall@K for eval.ks to
metrics/by_model/NAME/{valid,eval}.json. `--merge` gathers those files for the models of
eval.models, in that order, into metrics/valid.json, metrics/eval.json ({model: metrics}) and
metrics/eval_by_k.csv. DVC runs one `evaluate-model@NAME` stage per entry of eval.models, then
the merge (stage `evaluate`), so only the models listed are trained.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

import typer

from molar.config import Params
from molar.data.split import SplitData, load_split
from molar.errors import UserError
from molar.io import METRICS, MODELS, PROCESSED, atomic_path, write_json
from molar.model_metrics import PART_FILES, by_k_csv, merge_model_metrics, model_dir
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, use_threads, user_errors

if TYPE_CHECKING:  # torch loads only when a stage runs: `molar --help` stays fast
    import torch

ScoreFn = Callable[[list[list[int]]], "torch.Tensor"]


ScorerFor = Callable[[str], ScoreFn]  # split name (valid or test) -> the score function to rank it with
BY_MODEL = METRICS / "by_model"  # per-model metric files, merged by `molar evaluate --merge`


def _popularity(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.popularity import load_popularity

    # one count row per split, over what the model may know when that split is ranked
    models = {part: load_popularity(MODELS / "popularity", part) for part in PART_FILES}
    return lambda part: models[part].score


def _sasrec(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.sasrec import load_scorer

    score_fn = load_scorer(MODELS / "sasrec")
    return lambda part: score_fn


def _molar(split: SplitData, params: Params) -> ScorerFor:
    from molar.models.molar import load_scorer

    score_fn = load_scorer(MODELS / "molar")
    return lambda part: score_fn


# eval.models name -> builder of its scorer; each model lives in one molar/models file.
SCORERS: dict[str, Callable[[SplitData, Params], ScorerFor]] = {
    "popularity": _popularity,
    "sasrec": _sasrec,
    "molar": _molar,
}


MODEL_OPTION = typer.Option(None, "--model", help=f"evaluate this model ({', '.join(SCORERS)}) into {BY_MODEL}/NAME/")
MERGE_OPTION = typer.Option(False, "--merge", help=f"merge {BY_MODEL}/NAME/ of the eval.models into {METRICS}/")


def main(params: Path = PARAMS_OPTION, model: Optional[str] = MODEL_OPTION, merge: bool = MERGE_OPTION) -> None:
    cfg = read_params(params)
    with user_errors():
        if (model is not None) == merge:  # both or neither
            raise UserError("give one of --model NAME (evaluate one model) or --merge (write metrics/eval.json)")
        if model is not None and model not in SCORERS:
            raise UserError(f"--model {model}: no scorer of that name; available: {', '.join(SCORERS)}")
    if merge:
        _merge(cfg)
    else:
        _evaluate(model, cfg)


def _evaluate(name: str, cfg: Params) -> None:
    import torch

    from molar.evaluate import evaluate_scorer  # imported here so `molar --help` stays fast

    out = model_dir(BY_MODEL, name)
    prepare_outputs(*(out / f for f in PART_FILES.values()))
    use_threads(cfg)
    torch.manual_seed(cfg.seed)
    with user_errors():
        split = load_split(PROCESSED)
        scorer_for = SCORERS[name](split, cfg)
    for part, targets in (("valid", split.valid), ("test", split.test)):
        metrics = evaluate_scorer(
            scorer_for(part),
            targets.histories,
            targets.targets,
            split.n_items,
            ks=cfg.eval.ks,
            mask_history=cfg.eval.mask_history,
            chunk_size=cfg.eval.user_chunk_size,
        )
        typer.echo(f"{part:5s} {name:12s} " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        write_json(metrics, out / PART_FILES[part])


def _merge(cfg: Params) -> None:
    prepare_outputs(*(METRICS / f for f in PART_FILES.values()), METRICS / "eval_by_k.csv")
    with user_errors():
        merged = merge_model_metrics(BY_MODEL, cfg.eval.models, cfg.eval.ks)
    for part, name in PART_FILES.items():
        write_json(merged[part], METRICS / name)
    with atomic_path(METRICS / "eval_by_k.csv") as tmp:
        tmp.write_text(by_k_csv(merged["test"], cfg.eval.ks))
    typer.echo(f"evaluate: {', '.join(cfg.eval.models)} -> {', '.join(str(METRICS / n) for n in PART_FILES.values())}")
