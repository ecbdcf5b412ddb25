"""Evaluate one model (--model NAME) or merge the models of eval.models (--merge) into metrics/.

`--model NAME` ranks the full catalog for every validation and test user, with the user's
history masked (eval.mask_history), and writes NDCG@K / Recall@K for eval.ks to
metrics/by_model/NAME/{valid,eval}.json, and the per-user metrics they average (for paired
significance tests, `molar significance`) to metrics/by_model/NAME/{valid,test}_users.parquet. `--merge` gathers those files for the models of
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
from molar.io import METRICS, MODELS, PROCESSED, atomic_path, write_json, write_parquet
from molar.model_metrics import PART_FILES, USER_FILES, by_k_csv, merge_model_metrics, model_dir, user_metrics_frame
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


def _id_model(name: str) -> Callable[[SplitData, Params], ScorerFor]:
    """The scorer of a registered ID model: its checkpoint in data/models/NAME/, one for both splits."""

    def build(split: SplitData, params: Params) -> ScorerFor:
        from molar.recipes.id_models import load_scorer

        score_fn = load_scorer(MODELS / name)
        return lambda part: score_fn

    return build


def _molar(split: SplitData, params: Params) -> ScorerFor:
    from molar.recipes.molar import load_scorer

    score_fn = load_scorer(MODELS / "molar")
    return lambda part: score_fn


def _late_fusion(name: str) -> Callable[[SplitData, Params], ScorerFor]:
    """The ensemble ``name`` (e.g. molar+sasrec, molar/models/late_fusion.py): its components'
    frozen scorers, standardised and fused with the w of data/models/NAME/config.json."""

    def build(split: SplitData, params: Params) -> ScorerFor:
        from molar.io import checkpoint_key
        from molar.models.late_fusion import LateFusionConfig, fuse

        fitted = LateFusionConfig.load(MODELS / name)
        changed = [c for c in fitted.components if fitted.component_keys.get(c) != checkpoint_key(MODELS / c)]
        if changed:
            raise UserError(f"{MODELS / name}: fitted on other checkpoints of {', '.join(changed)}; rerun `molar train-late-fusion`")
        base, added = (scorer_builder(c)(split, params) for c in fitted.components)
        return lambda part: fuse(base(part), added(part), fitted.weight)

    return build


# eval.models name -> builder of its scorer; each model lives in one molar/models file. Every
# ID model of molar/models/registry.py is scored the same way (scorer_builder): none is listed here.
SCORERS: dict[str, Callable[[SplitData, Params], ScorerFor]] = {
    "popularity": _popularity,
    "molar": _molar,
    "molar+sasrec": _late_fusion("molar+sasrec"),  # an ensemble (late ID fusion), fitted by train-late-fusion
}


def scorer_builder(name: str) -> Callable[[SplitData, Params], ScorerFor]:
    """The scorer builder of eval.models name ``name``: one of SCORERS or an ID model of the registry."""
    if name in SCORERS:
        return SCORERS[name]
    from molar.models.registry import ID_MODELS  # torch loads here, not at `molar --help`

    if name not in ID_MODELS:
        raise UserError(f"--model {name}: no scorer of that name; available: {', '.join([*SCORERS, *ID_MODELS])}")
    return _id_model(name)


MODEL_OPTION = typer.Option(None, "--model", help=f"evaluate this model ({', '.join(SCORERS)} or an ID model, e.g. sasrec) into {BY_MODEL}/NAME/")
MERGE_OPTION = typer.Option(False, "--merge", help=f"merge {BY_MODEL}/NAME/ of the eval.models into {METRICS}/")


def main(params: Path = PARAMS_OPTION, model: Optional[str] = MODEL_OPTION, merge: bool = MERGE_OPTION) -> None:
    cfg = read_params(params)
    with user_errors():
        if (model is not None) == merge:  # both or neither
            raise UserError("give one of --model NAME (evaluate one model) or --merge (write metrics/eval.json)")
        if model is not None:
            scorer_builder(model)  # an unknown name fails before any output is touched
    if merge:
        _merge(cfg)
    else:
        _evaluate(model, cfg)


def _evaluate(name: str, cfg: Params) -> None:
    import torch

    # imported here so `molar --help` stays fast
    from molar.evaluate import metrics_from_ranks, per_user_metrics, scorer_ranks

    out = model_dir(BY_MODEL, name)
    prepare_outputs(*(out / f for f in PART_FILES.values()), *(out / f for f in USER_FILES.values()))
    use_threads(cfg)
    torch.manual_seed(cfg.seed)
    with user_errors():
        split = load_split(PROCESSED)
        scorer_for = scorer_builder(name)(split, cfg)
    for part, targets in (("valid", split.valid), ("test", split.test)):
        ranks = scorer_ranks(
            scorer_for(part),
            targets.histories,
            targets.targets,
            split.n_items,
            mask_history=cfg.eval.mask_history,
            chunk_size=cfg.eval.user_chunk_size,
        )
        metrics = metrics_from_ranks(ranks, cfg.eval.ks)  # the aggregate and the per-user rows: one ranking
        typer.echo(f"{part:5s} {name:12s} " + "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        write_json(metrics, out / PART_FILES[part])
        users = user_metrics_frame(targets.user_idx, targets.targets, ranks, per_user_metrics(ranks, cfg.eval.ks))
        write_parquet(users, out / USER_FILES[part])


def _merge(cfg: Params) -> None:
    prepare_outputs(*(METRICS / f for f in PART_FILES.values()), METRICS / "eval_by_k.csv")
    with user_errors():
        merged = merge_model_metrics(BY_MODEL, cfg.eval.models, cfg.eval.ks)
    for part, name in PART_FILES.items():
        write_json(merged[part], METRICS / name)
    with atomic_path(METRICS / "eval_by_k.csv") as tmp:
        tmp.write_text(by_k_csv(merged["test"], cfg.eval.ks))
    typer.echo(f"evaluate: {', '.join(cfg.eval.models)} -> {', '.join(str(METRICS / n) for n in PART_FILES.values())}")
