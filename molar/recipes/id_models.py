"""The next-item recipe that trains every registered ID model, and the frozen entry points other stages use.

``train_id_model(name, ...)`` builds ``ID_MODELS[name].from_params(n_items, section)`` and trains
it on a leave-one-out split: every position predicts its next item (``<model>.loss``: ce | bce |
sampled_ce) plus the model's own ``auxiliary_loss`` (DuoRec's contrastive term, fed same-target
partners when the model asks: ``SameTargetPartners``), the epoch is selected by validation NDCG@10
with early stopping, resumable through ``molar.train.fit``. ``load_scorer(model_or_dir)`` feeds
the evaluator, ``encode_users(model, histories)`` gives frozen user vectors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from molar import losses
from molar.errors import UserError
from molar.evaluate import evaluate_scorer, frozen_scorer
from molar.models.id_model import NextItemBatch, SequentialRecommender, left_pad
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


class SameTargetPartners:
    """For each training row, another training prefix followed by the same item as the row's last target.

    The candidates are DuoRec's "semantic augmentation" pool (RecBole's DuoRec): every prefix of
    every training sequence (each position j >= 1 of sequence s is the sample ``s[:j] -> s[j]``,
    its prefix cut to the last ``max_length`` items), the row's own sample ``s[:-1] -> s[-1]``
    excluded. ``draw(rng)`` picks one per row uniformly, afresh every epoch (as RecBole draws for
    each batch), from the epoch's RNG; a row whose target no other sample has gets its own prefix,
    as RecBole falls back to the sequence itself.
    """

    def __init__(self, sequences: Sequence[Sequence[int]], rows: Sequence[int], max_length: int) -> None:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences])  # every training item, in order
        self.max_length = max_length
        # a sample is the flat index g of its target; its prefix is flat[max(begin[g], g - max_length):g]
        self.begin = np.repeat(offsets, lengths)
        samples = np.flatnonzero(np.arange(len(self.flat)) != self.begin)  # every position but a sequence's first
        by_target = samples[np.argsort(self.flat[samples], kind="stable")]
        sorted_targets = self.flat[by_target]
        rows = np.asarray(rows, dtype=np.int64)
        self.own = offsets[rows] + lengths[rows] - 1  # each row's own sample: its last target
        target = self.flat[self.own]
        self.first = np.searchsorted(sorted_targets, target, side="left")  # the row target's block of samples
        self.others = np.searchsorted(sorted_targets, target, side="right") - self.first - 1
        rank_of = np.empty(len(self.flat), dtype=np.int64)
        rank_of[by_target] = np.arange(len(by_target))
        self.own_rank = rank_of[self.own] - self.first  # where the row's own sample sits in its block
        self.by_target = by_target

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One partner sample (a flat target index) per row, uniform over the other samples of its target."""
        u = rng.integers(0, np.maximum(self.others, 1))  # 0..others-1
        # step over the row's own sample in its block; a block of the own sample alone: itself
        u = np.where(self.others > 0, u + (u >= self.own_rank), self.own_rank)
        return self.by_target[self.first + u]

    def prefixes(self, samples: np.ndarray) -> torch.Tensor:
        """The prefixes of ``samples`` (flat target indices), left-padded [B, L'] (L' = the longest)."""
        return left_pad([self.flat[max(self.begin[g], g - self.max_length) : g] for g in samples], self.max_length)


class NextItemBatches:
    """Shuffled training batches of (inputs, targets), both [B, L] left-padded, 0 = padding.

    Every training sequence contributes its last ``max_length + 1`` items: inputs are all but the
    last, targets all but the first, so every position predicts its next item. Sequences with
    fewer than 2 items have no pair and are left out. The order of epoch e is a pure function of
    (seed, e); each batch is cut to its longest sequence. With several processes (``rank`` of
    ``world``) each yields its share of the epoch's batches. With ``partners`` each batch is
    (inputs, targets, partners): per row a same-target partner prefix (``SameTargetPartners``),
    also a pure function of (seed, e), drawn after the order (which stays that of a run without).
    """

    def __init__(
        self,
        sequences: Sequence[Sequence[int]],
        max_length: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        partners: bool = False,
    ) -> None:
        kept = [i for i, s in enumerate(sequences) if len(s) >= 2]
        if not kept:
            raise UserError("no training sequence has 2 or more items; check the split (split.min_user_length)")
        usable = [list(sequences[i])[-(max_length + 1) :] for i in kept]
        self.padded = left_pad(usable, max_length + 1).numpy()
        self.lengths = np.array([len(s) for s in usable])
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world = rank, world  # several processes: each takes its share (molar.train.shard)
        self.partners = SameTargetPartners(sequences, kept, max_length) if partners else None

    def __len__(self) -> int:
        return shard_len(math.ceil(len(self.lengths) / self.batch_size), self.world)

    def __call__(self, epoch: int):
        rng = epoch_rng(self.seed, epoch)
        order = rng.permutation(len(self.lengths))
        partner_of = self.partners.draw(rng) if self.partners is not None else None
        all_rows = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        for rows in shard(all_rows, self.rank, self.world):
            width = int(self.lengths[rows].max())
            seqs = torch.from_numpy(np.ascontiguousarray(self.padded[rows, -width:]))
            inputs, targets = seqs[:, :-1], seqs[:, 1:]
            # a padding input has no history to predict from: its target is padding too
            targets = targets.masked_fill(inputs == 0, 0)
            if partner_of is None:
                yield inputs, targets
            else:
                yield inputs, targets, self.partners.prefixes(partner_of[rows])


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
    on_validate: Callable[[SequentialRecommender], None] | None = None,
    build: Callable[[int, Any], SequentialRecommender] | None = None,
) -> tuple[SequentialRecommender, FitResult]:
    """Train the registered ID model ``name`` on ``train`` sequences, select the epoch by validation NDCG@10 (resumable).

    ``on_validate(model)`` runs after each validation with the model as it is then (benchmarks use
    it to follow test metrics over wall time); it never influences training or selection.
    ``build(n_items, params)`` makes the fresh model in place of the registry class's ``from_params``
    (e.g. a content SASRec over another item-content file), under the same seed.
    """
    model_class = id_model_class(name)
    torch.manual_seed(seed)
    model = (build or model_class.from_params)(n_items, params)
    process = process_state()
    batches = NextItemBatches(
        train,
        params.max_length,
        params.batch_size,
        seed,
        process.process_index,
        process.num_processes,
        partners=model.same_target_partners,  # the model asks for them (DuoRec's supervised views)
    )
    settings = LoopSettings.from_section(params, seed, validate_every=params.eval_every)

    def compute_loss(m: SequentialRecommender, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, dict[str, float]]:
        batch = NextItemBatch(*batch)
        core = getattr(m, "module", m)  # the model itself under a DDP wrapper
        states = m(batch.inputs)
        loss = losses.next_item_loss(params.loss, states, batch.targets, core.item_embeddings(), params.num_negatives)
        logs = {"loss": loss.item()}
        extra = core.auxiliary_loss(batch, states)  # the model's own term, e.g. DuoRec's contrastive one
        if extra is not None:
            term, extra_logs = extra
            logs = {"next_item_loss": logs["loss"], **extra_logs}
            loss = loss + term
            logs["loss"] = loss.item()
        return loss, logs

    def validate(m: SequentialRecommender) -> dict[str, float]:
        metrics = evaluate_scorer(
            load_scorer(m),
            valid_histories,
            valid_targets,
            n_items,
            ks=(10,),
            mask_history=mask_history,
            chunk_size=eval_chunk_size,
            progress=False,
        )
        if on_validate is not None:
            on_validate(m)
        return metrics

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
