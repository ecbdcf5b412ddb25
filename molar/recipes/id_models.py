"""The next-item recipe that trains every registered ID model, and the frozen entry points other stages use.

``train_id_model(name, ...)`` builds ``ID_MODELS[name].from_params(n_items, section)`` and trains
it on a leave-one-out split: every position predicts its next item (``<model>.loss``: ce | bce |
sampled_ce), the epoch is selected by validation NDCG@10 with early stopping, resumable through
``molar.train.fit``. ``load_scorer(model_or_dir)`` feeds the evaluator, ``encode_users(model,
histories)`` gives frozen user vectors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from molar import losses
from molar.errors import UserError
from molar.evaluate import evaluate_scorer, frozen_scorer
from molar.models.id_model import SequentialRecommender, left_pad
from molar.models.registry import id_model_class, load_id_model
from molar.train import (
    FitResult,
    LoopSettings,
    epoch_rng,
    fit,
    process_state,
    run_defining,
    run_key,
    sequences_fingerprint,
    shard,
    shard_len,
)


def _as_model(model_or_dir: SequentialRecommender | str | Path, device: str | torch.device | None) -> SequentialRecommender:
    if isinstance(model_or_dir, SequentialRecommender):
        return model_or_dir if device is None else model_or_dir.to(device)
    return load_id_model(model_or_dir, device=device or "cpu")


def load_scorer(
    model_dir: str | Path | SequentialRecommender, device: str | torch.device | None = None
) -> Callable[[list[list[int]]], torch.Tensor]:
    """``score_fn(histories) -> [B, n_items + 1]`` for ``molar.evaluate.evaluate_scorer`` (eval mode, no grad)."""
    return frozen_scorer(_as_model(model_dir, device))


def encode_users(
    model_or_dir: SequentialRecommender | str | Path,
    histories: Sequence[Sequence[int]],
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Frozen user vectors [B, d] (float32, CPU) for the given histories: batched, eval mode, no grad."""
    model = _as_model(model_or_dir, device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parts = [model.user_vectors(histories[i : i + batch_size]).float().cpu() for i in range(0, len(histories), batch_size)]
    finally:
        model.train(was_training)
    if not parts:
        return torch.zeros(0, model.item_embeddings().shape[1])
    return torch.cat(parts)


class NextItemBatches:
    """Shuffled training batches of (inputs, targets), both [B, L] left-padded, 0 = padding.

    Every training sequence contributes its last ``max_length + 1`` items: inputs are all but the
    last, targets all but the first, so every position predicts its next item. Sequences with
    fewer than 2 items have no pair and are left out. The order of epoch e is a pure function of
    (seed, e); each batch is cut to its longest sequence. With several processes (``rank`` of
    ``world``) each yields its share of the epoch's batches.
    """

    def __init__(
        self, sequences: Sequence[Sequence[int]], max_length: int, batch_size: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        usable = [list(s)[-(max_length + 1) :] for s in sequences if len(s) >= 2]
        if not usable:
            raise UserError("no training sequence has 2 or more items; check the split (split.min_user_length)")
        self.padded = left_pad(usable, max_length + 1).numpy()
        self.lengths = np.array([len(s) for s in usable])
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world  # several processes: each takes its share (molar.train.shard)

    def __len__(self) -> int:
        return shard_len(math.ceil(len(self.lengths) / self.batch_size), self.world)

    def __call__(self, epoch: int):
        order = epoch_rng(self.seed, epoch).permutation(len(self.lengths))
        all_rows = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for rows in shard(all_rows, self.rank, self.world):
            width = int(self.lengths[rows].max())
            seqs = torch.from_numpy(np.ascontiguousarray(self.padded[rows, -width:]))
            inputs, targets = seqs[:, :-1], seqs[:, 1:]
            # a padding input has no history to predict from: its target is padding too
            yield inputs, targets.masked_fill(inputs == 0, 0)


def train_id_model(
    name: str,
    params,  # the model's section, a molar.config.IdModelParams subclass (e.g. SasrecParams)
    train: Sequence[Sequence[int]],
    valid_histories: Sequence[Sequence[int]],
    valid_targets: Sequence[int],
    n_items: int,
    seed: int,
    state_dir: Path,
    mask_history: bool = True,
    eval_chunk_size: int = 1024,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    desc: str | None = None,
) -> tuple[SequentialRecommender, FitResult]:
    """Train the registered ID model ``name`` on ``train`` sequences, select the epoch by validation NDCG@10 (resumable)."""
    model_class = id_model_class(name)
    torch.manual_seed(seed)
    model = model_class.from_params(n_items, params)
    process = process_state()
    batches = NextItemBatches(train, params.max_length, params.batch_size, seed, process.process_index, process.num_processes)
    settings = LoopSettings.from_section(params, seed, validate_every=params.eval_every)

    def compute_loss(m: SequentialRecommender, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        core = getattr(m, "module", m)  # the model itself under a DDP wrapper
        states = m(inputs)
        loss = losses.next_item_loss(params.loss, states, targets, core.item_embeddings(), params.num_negatives)
        logs = {"loss": loss.item()}
        extra = core.auxiliary_loss(inputs, targets, states)  # the model's own term, e.g. DuoRec's contrastive one
        if extra is not None:
            term, extra_logs = extra
            logs = {"next_item_loss": logs["loss"], **extra_logs}
            loss = loss + term
            logs["loss"] = loss.item()
        return loss, logs

    def validate(m: SequentialRecommender) -> dict[str, float]:
        return evaluate_scorer(
            load_scorer(m),
            valid_histories,
            valid_targets,
            n_items,
            ks=(10,),
            mask_history=mask_history,
            chunk_size=eval_chunk_size,
            progress=False,
        )

    key = run_key(
        name,
        run_defining(params.model_dump(mode="json")),
        seed,
        n_items,
        mask_history,
        sequences_fingerprint(train),
        sequences_fingerprint(valid_histories),
        list(valid_targets),
        *(buffer for _, buffer in sorted(model.named_buffers())),  # frozen inputs, e.g. content SASRec's item table
    )
    result = fit(
        model,
        settings,
        batches,
        len(batches),
        compute_loss,
        state_dir=state_dir,
        run_key=key,
        validate=validate,
        select_metric="ndcg@10",
        on_epoch_end=on_epoch_end,
        desc=desc or name,
    )
    return model.eval(), result
