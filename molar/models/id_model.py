"""The interface every ID-based sequential recommender implements, and its checkpoint format.

An ID model reads left-padded item-id histories [B, L] (0 = padding, the last column the most
recent item) and gives a user vector after every position (``encode``); items are scored by a
dot product with its output item vectors (``item_embeddings``). That is all the evaluator, the
next-item training recipe (molar/recipes/id_models.py) and Molar's alignment need to know.

``encode`` is two seams: ``input_vectors`` (item ids -> the vectors the sequence encoder reads:
an ID table here, frozen content through a projection in content SASRec) and ``encode_vectors``
(the sequence encoder over any such vectors, also what Molar's ``dueg.kind`` reuses over MIRM
item embeddings). A model may add a loss term of its own to the next-item loss
(``auxiliary_loss``, e.g. DuoRec's contrastive regulariser); one that needs, per training row,
another sequence with the same target says so (``same_target_partners``) and the recipe's batches
carry them (``NextItemBatch.partners``).

A checkpoint is a folder: ``config.json`` (``{"model": <registry name>, **config}``) +
``model.safetensors``. ``molar.models.registry.load_id_model`` reads the name and dispatches.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from molar.errors import MissingInputError, UserError
from molar.io import atomic_path

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def left_pad(histories: Sequence[Sequence[int]], max_length: int) -> torch.LongTensor:
    """[B, L] item ids: each history's last ``max_length`` items, right-aligned, 0 on the left.

    L is the longest (truncated) history in the batch, at least 1.
    """
    width = max(1, min(max_length, max((len(h) for h in histories), default=1)))
    out = np.zeros((len(histories), width), dtype=np.int64)
    for row, h in enumerate(histories):
        tail = list(h)[-width:]
        if tail:
            out[row, width - len(tail) :] = tail
    return torch.from_numpy(out)


class NextItemBatch(NamedTuple):
    """One training batch of the next-item recipe (molar/recipes/id_models.py), as ``auxiliary_loss`` sees it.

    ``inputs`` / ``targets`` [B, L] are left-padded (0 = padding): every position predicts its next
    item, so ``targets[:, -1]`` is each row's last target. ``partners`` [B, L'] (only for a model
    whose ``same_target_partners`` is true, else None) holds per row another training prefix that
    is followed by that same last target (left-padded, at most ``max_length`` items; the row's own
    input where the training data has no other).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    partners: torch.Tensor | None = None


class SequentialRecommender(nn.Module, abc.ABC):
    """An ID-based next-item model: user vectors at every position, scored by item dot products."""

    max_length: int
    n_items: int
    # true: auxiliary_loss reads NextItemBatch.partners, so the recipe builds them (a per-instance choice)
    same_target_partners: bool = False

    @abc.abstractmethod
    def input_vectors(self, padded: torch.Tensor) -> torch.Tensor:
        """Left-padded item ids [B, L] -> the sequence encoder's input vectors [B, L, d_in]."""

    @abc.abstractmethod
    def encode_vectors(self, inputs: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Input vectors [B, L, d_in] with ``real`` [B, L] (False = padding) -> user vectors after each position [B, L, d].

        Causal: position t sees positions <= t only; padding never changes a real position's vector.
        """

    def encode(self, padded: torch.Tensor) -> torch.Tensor:
        """Left-padded histories [B, L] (0 = padding) -> user vectors after each position [B, L, d]."""
        if padded.dim() != 2:
            raise ValueError(f"{type(self).__name__}.encode expects [B, L] item ids, got shape {tuple(padded.shape)}")
        if padded.shape[1] > self.max_length:
            raise ValueError(
                f"{type(self).__name__}.encode: {padded.shape[1]} positions > max_length {self.max_length}; truncate with left_pad"
            )
        return self.encode_vectors(self.input_vectors(padded), padded != 0)

    @abc.abstractmethod
    def item_embeddings(self) -> torch.Tensor:
        """Output item vectors [n_items + 1, d]; row 0 is padding and is never a recommendation."""

    def auxiliary_loss(self, batch: NextItemBatch, states: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]] | None:
        """A loss term the model adds to the next-item loss of a training batch, with its log entries; None = none.

        ``states`` = ``self(batch.inputs)``, the pass the next-item loss reads (training mode). Any
        randomness must come from the global torch RNG (checkpointed by the training loop).
        """
        return None

    def forward(self, padded: torch.Tensor) -> torch.Tensor:
        """``encode``: going through ``__call__`` keeps hooks and DDP wrappers working."""
        return self.encode(padded)

    def user_vectors(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """The user vector after each history's most recent item [B, d]."""
        padded = left_pad(histories, self.max_length).to(self.item_embeddings().device)
        return self.encode(padded)[:, -1]

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of every item for each history [B, n_items + 1] (column 0 = padding)."""
        return self.user_vectors(histories) @ self.item_embeddings().T


# ------------------------------------------------------------------------- checkpoints
def write_checkpoint(directory: str | Path, name: str, config: dict, model: nn.Module) -> None:
    """``config.json`` ({"model": name, **config}) + ``model.safetensors`` into ``directory``, atomically as a whole."""
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        (tmp / CONFIG_FILE).write_text(json.dumps({"model": name, **config}, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / WEIGHTS_FILE))


def checkpoint_name(directory: str | Path) -> str:
    """The registry name a checkpoint folder was written under (its config.json "model")."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.exists() or not weights_path.exists():
        raise MissingInputError(
            f"{directory}: no ID-model checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}); "
            f"run `molar train-id --model {directory.name}` first"
        )
    name = json.loads(config_path.read_text()).get("model")
    if not isinstance(name, str):
        raise UserError(f"{config_path}: no \"model\" name; rerun `molar train-id --model {directory.name}`")
    return name


def read_checkpoint(directory: str | Path, name: str, device: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(config without "model", state dict) of a checkpoint written by ``write_checkpoint`` under ``name``."""
    directory = Path(directory)
    found = checkpoint_name(directory)
    if found != name:
        raise UserError(f"{directory / CONFIG_FILE}: a {found} checkpoint, not {name}")
    config = json.loads((directory / CONFIG_FILE).read_text())
    del config["model"]
    return config, load_file(str(directory / WEIGHTS_FILE), device=str(device))
