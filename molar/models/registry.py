"""Every ID model by name: what `molar train-id --model NAME`, `align.id_model` and `eval.models` may name.

A model here is a ``SequentialRecommender`` (molar/models/id_model.py) with
``from_params(n_items, section)`` (build it from its params.yaml section, e.g. ``sasrec``),
``save_pretrained(directory)`` and ``from_pretrained(directory, device)``. A model's section is
the one named like it, unless ``SECTIONS`` names another (models that share their keys).
"""

from __future__ import annotations

from pathlib import Path

import torch

from molar.errors import UserError
from molar.models.content_sasrec import SasrecImage, SasrecText, SasrecTextImage
from molar.models.duorec import DuoRec
from molar.models.fpmc import FPMC
from molar.models.gru4rec import GRU4Rec
from molar.models.id_model import CONFIG_FILE, SequentialRecommender, checkpoint_name
from molar.models.sasrec import SASRec

ID_MODELS: dict[str, type[SequentialRecommender]] = {
    "sasrec": SASRec,
    "fpmc": FPMC,
    "gru4rec": GRU4Rec,
    "duorec": DuoRec,
    "sasrec-text": SasrecText,
    "sasrec-image": SasrecImage,
    "sasrec-text-image": SasrecTextImage,
}

# the params.yaml section of each model not named like its model: the content SASRecs share one
SECTIONS: dict[str, str] = {"sasrec-text": "sasrec_content", "sasrec-image": "sasrec_content", "sasrec-text-image": "sasrec_content"}


def id_model_class(name: str) -> type[SequentialRecommender]:
    if name not in ID_MODELS:
        raise UserError(f"{name!r} is not an ID model; registered: {', '.join(ID_MODELS)} (molar/models/registry.py)")
    return ID_MODELS[name]


def id_model_section(params, name: str):
    """The section of ``params`` (a molar.config.Params) that builds and trains ID model ``name``."""
    id_model_class(name)
    return getattr(params, SECTIONS.get(name, name))


def load_id_model(directory: str | Path, device: str | torch.device = "cpu") -> SequentialRecommender:
    """The ID model saved in ``directory``, of the class its config.json names, in eval mode."""
    name = checkpoint_name(directory)
    if name not in ID_MODELS:
        raise UserError(f"{Path(directory) / CONFIG_FILE}: {name!r} is not an ID model; registered: {', '.join(ID_MODELS)}")
    return ID_MODELS[name].from_pretrained(directory, device=device)
