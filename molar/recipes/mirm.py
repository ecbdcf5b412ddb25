"""The train-mirm recipe: fine-tune MIRM's backbone on the SFT mixture (full or LoRA) through
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
from molar.train import LoopSettings, epoch_rng, fit, process_state, shard, shard_len


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

    Causal-LM loss on answer tokens only; ``params.finetune`` full or lora (merged back into the
    weights at the end, so the result is a plain transformers model); warm-up from
    ``warmup_start_factor`` x lr, then cosine; resumable from ``state_dir`` (molar.train.fit).
    Sets ``backbone.model`` to the trained model and returns the ``FitResult``.
    """
    if params.finetune not in ("full", "lora"):
        raise ValueError(f"mirm.finetune: {params.finetune!r} does not train; nothing to fine-tune")
    encoded = [
        encoder.encode_sft(row["prompt"], row["image_paths"] or [], row["target"])
        for row in examples.select("prompt", "image_paths", "target").iter_rows(named=True)
    ]
    state = process_state()
    batches = SftBatches(encoder, encoded, params.batch_size, seed, state.process_index, state.num_processes)
    model = backbone.model
    side = image_side(model)
    if side is not None and "image" not in params.modalities:
        side.requires_grad_(False)  # never used without images: no gradients, no optimizer state
    if params.finetune == "lora":
        model = add_lora(model, params.lora_r, params.lora_alpha, params.lora_dropout)
        if backbone.image_features is not None and "image" in params.modalities:
            side.requires_grad_(True)  # a fresh projector: LoRA's freezing would leave it random
    settings = LoopSettings.from_section(
        params, seed, mixed_precision={"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[params.dtype]
    )

    def compute_loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        loss = m(batch)
        return loss, {"loss": loss.item()}

    wrapper = SftModel(model)
    result = fit(
        wrapper,
        settings,
        batches,
        len(batches),
        compute_loss,
        state_dir=state_dir,
        run_key=run_key,
        on_epoch_end=on_epoch_end,
        desc="mirm",
    )
    trained = wrapper.model
    if params.finetune == "lora":
        trained = trained.merge_and_unload()
    backbone.model = trained.eval()
    return result
