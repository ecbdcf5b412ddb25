"""Count item interactions for the popularity baseline; save data/models/popularity/.

One count row per split, each over what a model may know when that split is ranked (the
training sequences for valid, the test histories for test): see molar/models/popularity.py.
"""

from __future__ import annotations

from pathlib import Path

import typer

from molar.io import MODELS, PROCESSED
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, user_errors

MODEL_DIR = MODELS / "popularity"


def main(params: Path = PARAMS_OPTION) -> None:
    from molar.data.split import load_split
    from molar.models.popularity import save_popularity

    read_params(params)  # no params of its own, but a broken params.yaml stops every stage
    prepare_outputs(MODEL_DIR)
    with user_errors():
        split = load_split(PROCESSED)
        save_popularity(MODEL_DIR, {"valid": split.valid.histories, "test": split.test.histories}, split.n_items)
    typer.echo(f"train-popularity: counts of {split.n_items:,} items -> {MODEL_DIR}/")
