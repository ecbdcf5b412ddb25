"""Fit the late-fusion ensemble molar+sasrec (late ID fusion, issue 13): nothing is trained.

Reads the frozen Molar (data/models/molar/) and SASRec (data/models/sasrec/), chooses the w of
score = z(Molar) + w x z(SASRec) (per-user standardised scores, molar/models/late_fusion.py)
from late_fusion.weights by validation NDCG@10, and writes data/models/molar+sasrec/config.json:
the components, w, each grid w's validation NDCG@10 and the components' checkpoint hashes (so
the ensemble's evaluation reruns whenever a component changes). `molar evaluate --model
molar+sasrec` then scores the ensemble; metric tables name it molar+sasrec, an ensemble.
"""

from __future__ import annotations

from pathlib import Path

import typer

from molar.io import MODELS, PROCESSED
from stages.common import (
    PARAMS_OPTION,
    prepare_outputs,
    read_params,
    use_threads,
    user_errors,
)

MODEL = "molar+sasrec"  # the ensemble of molar.config.EnsembleName this stage fits


def main(params: Path = PARAMS_OPTION) -> None:
    import torch

    from molar.data.split import load_split
    from molar.io import checkpoint_key
    from molar.models.late_fusion import LateFusionConfig, components_of
    from molar.recipes.late_fusion import choose_weight
    from stages.evaluate import scorer_builder

    cfg = read_params(params)
    out = MODELS / MODEL
    prepare_outputs(out)
    use_threads(cfg)
    torch.manual_seed(cfg.seed)
    components = components_of(MODEL)
    with user_errors():
        split = load_split(PROCESSED)
        base, added = (scorer_builder(name)(split, cfg)("valid") for name in components)
        weight, ndcg = choose_weight(
            base, added, split.valid.histories, split.valid.targets, split.n_items, cfg.late_fusion.weights,
            mask_history=cfg.eval.mask_history, chunk_size=cfg.eval.user_chunk_size,
        )
    keys = {name: checkpoint_key(MODELS / name) for name in components}
    LateFusionConfig(components, weight, {f"{w:g}": round(v, 6) for w, v in ndcg.items()}, keys).save(out)
    grid = "  ".join(f"w={w:g}: {v:.4f}" for w, v in ndcg.items())
    typer.echo(f"train-late-fusion: {MODEL} w = {weight:g} (valid NDCG@10 {ndcg[weight]:.4f}; {grid}) -> {out}/")
