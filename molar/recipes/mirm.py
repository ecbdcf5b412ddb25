"""The train-mirm recipe: fine-tune MIRM's backbone on the SFT mixture (full, LoRA or staged) through
``molar.train.fit``. The model side (prompt encoding, the SFT loss, item embeddings) is
molar/models/mirm.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import polars as pl
import torch

from molar.backbones import Backbone
from molar.errors import UserError
from molar.models.mirm import Encoded, PromptEncoder, SftModel, image_side
from molar.train import FitResult, LoopSettings, epoch_rng, fit, process_state, shard, shard_len


# ----------------------------------------------------------------------------- fine-tuning
# LoRA goes on the language model's attention and MLP projections (Qwen2-VL's vision blocks name
# theirs qkv/proj/fc1/fc2, so the vision tower stays frozen as in the paper's setting; the
# projector of smollm2-135m+mobilenet, linear_1/linear_2, stays fully trainable: it starts random).
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
_BUCKET = 50  # batches whose examples are length-sorted together (less padding, still shuffled)


class SftBatches:
    """``batches(epoch)``: the shuffled, padded SFT micro-batches of one epoch (a pure function of epoch).

    Examples are shuffled, sorted by length within buckets of ``_BUCKET`` batches (less padding),
    cut into batches and the batches shuffled again. With several processes each takes every
    ``world``-th batch, wrapping around so all take the same number of steps.
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        encoded: Sequence[Encoded],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if not encoded:
            raise UserError("no SFT examples to train on; check sft.mix and sft.samples_per_task")
        self.encoder, self.encoded, self.batch_size = encoder, list(encoded), batch_size
        self.seed, self.rank, self.world = seed, rank, world
        self.global_batches = -(-len(self.encoded) // batch_size)

    def __len__(self) -> int:
        return shard_len(self.global_batches, self.world)

    def indices(self, epoch: int) -> list[list[int]]:
        rng = epoch_rng(self.seed, epoch)
        order = rng.permutation(len(self.encoded)).tolist()
        span = self.batch_size * _BUCKET
        batches = []
        for start in range(0, len(order), span):
            bucket = sorted(order[start : start + span], key=lambda i: len(self.encoded[i]))
            batches += [bucket[j : j + self.batch_size] for j in range(0, len(bucket), self.batch_size)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        return shard(batches, self.rank, self.world)

    def __call__(self, epoch: int):
        for idx in self.indices(epoch):
            yield self.encoder.collate([self.encoded[i] for i in idx])


def add_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    return get_peft_model(model, config)


def finetune(
    backbone: Backbone,
    encoder: PromptEncoder,
    examples: pl.DataFrame,
    params,  # molar.config.MirmParams
    seed: int,
    state_dir: Path,
    run_key: str,
    on_epoch_end=None,
):
    """Fine-tune ``backbone.model`` on SFT ``examples`` (task, prompt, image_paths, target).

    Causal-LM loss on answer tokens only; ``params.finetune`` full, lora (merged back into the
    weights at the end, so the result is a plain transformers model) or staged (``staged``); warm-up
    from ``warmup_start_factor`` x lr, then cosine; resumable from ``state_dir`` (molar.train.fit).
    Sets ``backbone.model`` to the trained model and returns the ``FitResult``.
    """
    if params.finetune not in ("full", "lora", "staged"):
        raise ValueError(f"mirm.finetune: {params.finetune!r} does not train; nothing to fine-tune")
    if params.finetune == "staged":
        return staged(backbone, encoder, examples, params, seed, state_dir, run_key, on_epoch_end)
    model = backbone.model
    side = image_side(model)
    if side is not None and "image" not in params.modalities:
        side.requires_grad_(False)  # never used without images: no gradients, no optimizer state
    if params.finetune == "lora":
        model = add_lora(model, params.lora_r, params.lora_alpha, params.lora_dropout)
        if backbone.image_features is not None and "image" in params.modalities:
            side.requires_grad_(True)  # a fresh projector: LoRA's freezing would leave it random
    trained, result = _fit_sft(model, encoder, examples, params, seed, state_dir, run_key, on_epoch_end, "mirm")
    if params.finetune == "lora":
        trained = trained.merge_and_unload()
    backbone.model = trained.eval()
    return result


def staged(backbone: Backbone, encoder: PromptEncoder, examples: pl.DataFrame, params, seed: int, state_dir: Path,
           run_key: str, on_epoch_end=None) -> FitResult:
    """``mirm.finetune: staged``, LLaVA's two stages on the Molar mixture, for a backbone with a projector
    (``smollm2-135m+mobilenet``):

    1. the IT examples that show an image train the projector alone (the LLM frozen), at
       ``projector_lr``: image features learn to read as the words of the item's description;
    2. the rest (SA, UB, and IT examples without an image) train LoRA on the LLM, at ``lr``, the
       projector still trainable (UB prompts show images); LoRA is merged at the end.

    Each stage runs ``epochs`` epochs and resumes on its own (``state_dir``/projector, ``state_dir``/lora).
    Returns one ``FitResult``: both stages' epoch records in order (``stage`` 1 or 2), steps summed.
    """
    model = backbone.model
    side = image_side(model)
    if backbone.image_features is None or side is None:
        raise UserError(
            f"mirm.finetune: staged trains a projector first; {backbone.name} has none (or mirm.modalities has no "
            "image). Use it with mirm.backbone: smollm2-135m+mobilenet and image in mirm.modalities, or use full / lora"
        )
    with_image = pl.col("image_paths").list.len().fill_null(0) > 0
    first = examples.filter((pl.col("task") == "IT") & with_image)
    second = examples.filter(~((pl.col("task") == "IT") & with_image))
    results: list[tuple[int, FitResult]] = []
    if first.height:
        model.requires_grad_(False)
        side.requires_grad_(True)
        model, result = _fit_sft(model, encoder, first, params.model_copy(update={"lr": params.projector_lr}), seed,
                                 Path(state_dir) / "projector", f"{run_key}/projector", on_epoch_end, "mirm-projector")
        results.append((1, result))
    if second.height:
        model.requires_grad_(True)
        model = add_lora(model, params.lora_r, params.lora_alpha, params.lora_dropout)
        side.requires_grad_(True)
        model, result = _fit_sft(model, encoder, second, params, seed, Path(state_dir) / "lora", f"{run_key}/lora",
                                 on_epoch_end, "mirm-lora")
        model = model.merge_and_unload()
        results.append((2, result))
    if not results:
        raise UserError("no SFT examples to train on; check sft.mix and sft.samples_per_task")
    backbone.model = model.eval()
    return FitResult(
        history=[{**record, "stage": stage} for stage, r in results for record in r.history],
        best_epoch=results[-1][1].best_epoch,
        best_metric=None,
        best_state={},
        steps=sum(r.steps for _, r in results),
        stopped_early=False,
        resumed=any(r.resumed for _, r in results),
        extra={"stage_examples": {"1": first.height, "2": second.height}},
    )


def _fit_sft(model, encoder: PromptEncoder, examples: pl.DataFrame, params, seed: int, state_dir: Path, run_key: str,
             on_epoch_end, desc: str) -> tuple[torch.nn.Module, FitResult]:
    """Train ``model``'s trainable parameters on ``examples`` with the loop settings of ``params``."""
    encoded = [
        encoder.encode_sft(row["prompt"], row["image_paths"] or [], row["target"])
        for row in examples.select("prompt", "image_paths", "target").iter_rows(named=True)
    ]
    state = process_state()
    batches = SftBatches(encoder, encoded, params.batch_size, seed, state.process_index, state.num_processes)
    settings = LoopSettings.from_section(
        params, seed, mixed_precision={"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[params.dtype]
    )

    def compute_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = m(batch)
        return loss, {"loss": loss.item()}

    wrapper = SftModel(model)
    result = fit(wrapper, settings, batches, len(batches), compute_loss, state_dir=state_dir, run_key=run_key,
                 on_epoch_end=on_epoch_end, desc=desc)
    return wrapper.model, result
