"""The train-molar recipe: DUEG (+ MIRM end to end, + the alignment head) trained with
``L_bce + align.alpha * L_align`` through ``molar.train.fit``, and the frozen scorer of a trained
Molar for the evaluator. The model and its objective are molar/models/molar.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from molar import losses
from molar.evaluate import evaluate_scorer, frozen_scorer
from molar.models.dueg import Dueg
from molar.models.molar import MirmItems, MolarBatches, MolarModel, MolarObjective, ObjectiveSettings, StepLog
from molar.models.registry import id_model_section
from molar.recipes.id_models import NextItemBatches
from molar.train import LoopSettings, fit, process_state


def load_scorer(model_or_dir: MolarModel | str | Path, device: str | torch.device | None = None) -> Callable[[list[list[int]]], torch.Tensor]:
    """``score_fn(histories) -> [B, n_items + 1]`` for ``molar.evaluate.evaluate_scorer`` (eval mode, no grad)."""
    model = model_or_dir if isinstance(model_or_dir, MolarModel) else MolarModel.from_pretrained(model_or_dir, device or "cpu")
    if device is not None:
        model = model.to(device)

    return frozen_scorer(model)



# ---------------------------------------------------------------------------- training
def _checkpoint_activations(module: nn.Module) -> None:
    """Recompute a transformers model's layer activations in the backward pass (``train.gradient_checkpointing``)."""
    kwargs = {"use_reentrant": False}
    if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.x name
        module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def checkpoint_activations(model: MolarModel) -> None:
    """``train.gradient_checkpointing``: DUEG's and (end to end) MIRM's transformers layers recompute their
    activations in the backward pass. Non-reentrant checkpointing works with inputs_embeds that need no
    gradient; an ID-model user model (dueg.kind other than llm) is small and has no such layers."""
    if isinstance(model.dueg, Dueg):
        _checkpoint_activations(model.dueg.decoder)
    if isinstance(model.items, MirmItems):
        _checkpoint_activations(getattr(model.items.mirm, "model", model.items.mirm))


def param_groups(model: MolarModel, t) -> list[dict] | None:  # t: molar.config.TrainParams
    """AdamW groups where a part of the model trains at its own peak lr; None when all train at ``train.lr``.

    - End to end (MIRM is the item side), MIRM trains at ``train.mirm_lr``. What tells items apart is a small
      part of MIRM's states, which the item adapter's whitening scales up: at the user model's lr, one step of
      MIRM outweighs it (on the embedded default the item spread fell from 0.12 to 0.03 in one warm-up step).
    - With early ID fusion the ID table trains at ``train.lr x train.item_id_lr_scale``: it starts at 2% of
      the content's scale (ItemIdEmbedding), and an LLM user model's lr is a tenth of what an ID model's
      own table trains at (SASRec-CE on ML-1M: 3e-3), so at 1 the ID vectors may stay small.
    - The item adapter's learned maps (``dueg.item_adapter``) train at ``train.lr x train.item_adapter_lr_scale``:
      over cached items they are all that places items, and an ID model places its items at ~10x an LLM's lr.
    The rest (DUEG, alignment head) trains at ``train.lr``."""
    own: list[tuple[list[nn.Parameter], float]] = []
    if isinstance(model.items, MirmItems):
        own.append((list(model.items.mirm.parameters()), t.mirm_lr))
    if model.item_ids is not None and t.item_id_lr_scale != 1.0:
        own.append((list(model.item_ids.parameters()), t.lr * t.item_id_lr_scale))
    if t.item_adapter_lr_scale != 1.0:
        adapters = model.dueg.item_adapter_parameters()
        if adapters:  # none when the adapter is the identity (dueg.item_adapter auto, equal widths)
            own.append((adapters, t.lr * t.item_adapter_lr_scale))
    if not own:
        return None
    taken = {id(p) for params, _ in own for p in params}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [{"params": rest}] + [{"params": params, "lr": lr} for params, lr in own]


def train_molar(
    model: MolarModel,
    train: Sequence[Sequence[int]],
    valid_histories: Sequence[Sequence[int]],
    valid_targets: Sequence[int],
    params,  # molar.config.Params (train, align and the align.id_model sections are read)
    id_model: nn.Module | None,
    state_dir: str | Path,
    run_key: str,
    mask_history: bool = True,
    eval_chunk_size: int = 1024,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    desc: str = "molar",
):
    """Train DUEG (+ MIRM end to end, + the alignment head) with ``L_bce + alpha * L_align``.

    Resumable through ``molar.train.fit`` (state in ``state_dir``, keyed by ``run_key``, which
    must cover everything that defines the run); selects the epoch by validation NDCG@10.
    Returns ``(FitResult, StepLog)`` (the log is None on all but the main process of a
    multi-process run); the model is left holding the selected weights with its catalog item
    table refreshed.
    """
    t, a = params.train, params.align
    if a.train_id_model and id_model is None:
        raise ValueError(f"align.train_id_model: true needs the ID model (data/models/{a.id_model})")
    if a.alpha == 0:
        # the head gets no gradient: frozen, so a multi-process (DDP) run has no unused parameter
        model.align_head.requires_grad_(False)
    if t.gradient_checkpointing:
        checkpoint_activations(model)

    process = process_state()
    pairs = NextItemBatches(train, t.max_length, t.batch_size, params.seed, process.process_index, process.num_processes)
    batches = MolarBatches(pairs, len(pairs))
    step_log = StepLog(state_dir, run_key) if process.is_main_process else None  # one writer
    id_loss = None
    if a.train_id_model:
        model.id_model = id_model.train().requires_grad_(True)  # a submodule: optimised and checkpointed
        s = id_model_section(params, a.id_model)  # its own next-item loss, as train-id trains it

        def id_loss(hidden: torch.Tensor, targets: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
            return losses.next_item_loss(s.loss, hidden, targets, items, s.num_negatives)

    objective = MolarObjective(
        ObjectiveSettings(
            n_items=model.config.n_items,
            loss=t.loss,
            num_negatives=t.num_negatives,
            all_positions=t.all_positions,
            alpha=a.alpha,
            tau=a.tau,
            align_positions=a.positions,
            collapse_std=t.collapse_std,
        ),
        id_model=id_model,
        on_step=step_log.append if step_log is not None else None,
        co_train=a.train_id_model,
        id_loss=id_loss,
    )

    def validate(m: MolarModel) -> dict[str, float]:
        m.items.refresh()
        return evaluate_scorer(
            load_scorer(m), list(valid_histories), list(valid_targets), m.config.n_items,
            ks=(10,), mask_history=mask_history, chunk_size=eval_chunk_size, progress=False,
        )

    settings = LoopSettings.from_section(t, params.seed)
    result = fit(
        model, settings, batches, len(batches), objective, state_dir=state_dir, run_key=run_key,
        validate=validate, select_metric="ndcg@10", on_epoch_end=on_epoch_end, desc=desc,
        param_groups=param_groups(model, t),
    )
    if a.train_id_model:
        model.id_model.eval()
    return result, step_log
