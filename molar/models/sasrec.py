"""SASRec (Kang & McAuley 2018): causal self-attention over a user's item history.

The architecture of the reference PyTorch port (pmixer/SASRec.pytorch), pre-LN blocks:
item embeddings (row 0 = padding) scaled by sqrt(d), learned absolute positions (0 = padding),
embedding dropout, ``num_blocks`` x [x + MHA(LN(x)), x + FFN(LN(x))] with causal attention, a
final layer norm; items are scored by a dot product with the (shared, unscaled) item embeddings.
Histories are left-padded, so the last column is always the most recent item and carries
position ``max_length``. Padding keys are masked out of attention, so results do not depend on
how much padding a batch has.

Also here: the ``SequentialRecommender`` interface later ID models share, the training recipe on
a leave-one-out split (``train_sasrec``: all positions, next-item loss, early stopping on
validation NDCG@10 through ``molar.train.fit``), and the two entry points other stages use:
``load_scorer(model_dir)`` for the evaluator and ``encode_users(model, histories)`` for alignment.
"""

from __future__ import annotations

import abc
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from molar import losses
from molar.errors import MissingInputError, UserError
from molar.evaluate import frozen_scorer
from molar.io import atomic_path
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

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


# ------------------------------------------------------------------------ the interface
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


class SequentialRecommender(nn.Module, abc.ABC):
    """An ID-based next-item model: user vectors at every position, scored by item dot products."""

    max_length: int
    n_items: int

    @abc.abstractmethod
    def encode(self, padded: torch.Tensor) -> torch.Tensor:
        """Left-padded histories [B, L] (0 = padding) -> user vectors after each position [B, L, d]."""

    @abc.abstractmethod
    def item_embeddings(self) -> torch.Tensor:
        """Output item vectors [n_items + 1, d]; row 0 is padding and is never a recommendation."""

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


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class SasrecConfig:
    n_items: int
    hidden_size: int = 64
    num_blocks: int = 2
    num_heads: int = 1
    dropout: float = 0.2
    max_length: int = 50

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise UserError(f"sasrec.hidden_size ({self.hidden_size}) must be divisible by sasrec.num_heads ({self.num_heads})")
        if self.n_items < 1:
            raise ValueError(f"SASRec needs a catalog of at least one item (n_items={self.n_items})")


class _CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, length, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(d, eps=1e-8)
        self.attn = _CausalSelfAttention(d, heads, dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-8)
        # the original's point-wise feed-forward: two d x d layers, ReLU, dropout after each
        self.ffn = nn.Sequential(nn.Linear(d, d), nn.Dropout(dropout), nn.ReLU(), nn.Linear(d, d), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), allowed)
        return x + self.ffn(self.ffn_norm(x))


class SASRec(SequentialRecommender):
    def __init__(self, config: SasrecConfig) -> None:
        super().__init__()
        self.config = config
        self.n_items, self.max_length = config.n_items, config.max_length
        d = config.hidden_size
        self.item_emb = nn.Embedding(config.n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_length + 1, d, padding_idx=0)
        self.emb_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(d, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d, eps=1e-8)
        # as the reference port: Xavier-normal weights, zero biases, padding rows zero
        for name, p in self.named_parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
            elif "norm" not in name:
                nn.init.zeros_(p)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()

    def encode(self, padded: torch.Tensor) -> torch.Tensor:
        if padded.dim() != 2:
            raise ValueError(f"SASRec.encode expects [B, L] item ids, got shape {tuple(padded.shape)}")
        length = padded.shape[1]
        if length > self.max_length:
            raise ValueError(f"SASRec.encode: {length} positions > max_length {self.max_length}; truncate with left_pad")
        real = padded != 0  # [B, L]
        positions = torch.arange(self.max_length - length + 1, self.max_length + 1, device=padded.device)
        x = self.item_emb(padded) * math.sqrt(self.config.hidden_size)
        x = x + self.pos_emb(positions * real)
        x = self.emb_dropout(x) * real.unsqueeze(-1)
        # query i may see key j <= i that is a real item; every position also sees itself, so
        # padding rows (which no loss or score reads) never have an empty softmax.
        causal = torch.ones(length, length, dtype=torch.bool, device=padded.device).tril()
        allowed = (causal & real.unsqueeze(1)) | torch.eye(length, dtype=torch.bool, device=padded.device)
        allowed = allowed.unsqueeze(1)  # [B, 1, L, L], broadcast over heads
        for block in self.blocks:
            x = block(x, allowed) * real.unsqueeze(-1)
        return self.final_norm(x)

    def item_embeddings(self) -> torch.Tensor:
        return self.item_emb.weight

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` + ``model.safetensors`` into ``directory`` (atomically, as a whole)."""
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            (tmp / CONFIG_FILE).write_text(json.dumps({"model": "sasrec", **asdict(self.config)}, indent=2) + "\n")
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(tmp / WEIGHTS_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "SASRec":
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.exists() or not weights_path.exists():
            raise MissingInputError(f"{directory}: no SASRec checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}); run `molar train-sasrec` first")
        raw = json.loads(config_path.read_text())
        if raw.pop("model", "sasrec") != "sasrec":
            raise UserError(f"{config_path}: not a SASRec checkpoint")
        model = cls(SasrecConfig(**raw))
        model.load_state_dict(load_file(str(weights_path), device=str(device)))
        return model.to(device).eval()


# ----------------------------------------------------------- entry points for other stages
def _as_model(model_or_dir: SequentialRecommender | str | Path, device: str | torch.device | None) -> SequentialRecommender:
    if isinstance(model_or_dir, SequentialRecommender):
        return model_or_dir if device is None else model_or_dir.to(device)
    return SASRec.from_pretrained(model_or_dir, device=device or "cpu")


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


# ------------------------------------------------------------------------- training
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


def train_sasrec(
    train: Sequence[Sequence[int]],
    valid_histories: Sequence[Sequence[int]],
    valid_targets: Sequence[int],
    n_items: int,
    params,  # molar.config.SasrecParams
    seed: int,
    state_dir: Path,
    mask_history: bool = True,
    eval_chunk_size: int = 1024,
    on_epoch_end: Callable[[int, dict], None] | None = None,
    desc: str = "sasrec",
) -> tuple[SASRec, FitResult]:
    """Train SASRec on ``train`` sequences, select the epoch by validation NDCG@10 (resumable)."""
    from molar.evaluate import evaluate_scorer

    config = SasrecConfig(
        n_items=n_items,
        hidden_size=params.hidden_size,
        num_blocks=params.num_blocks,
        num_heads=params.num_heads,
        dropout=params.dropout,
        max_length=params.max_length,
    )
    torch.manual_seed(seed)
    model = SASRec(config)
    process = process_state()
    batches = NextItemBatches(train, params.max_length, params.batch_size, seed, process.process_index, process.num_processes)
    settings = LoopSettings.from_section(params, seed, validate_every=params.eval_every)

    def compute_loss(m: SASRec, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        inputs, targets = batch
        core = getattr(m, "module", m)  # the model itself under a DDP wrapper
        loss = losses.next_item_loss(params.loss, m(inputs), targets, core.item_embeddings(), params.num_negatives)
        return loss, {"loss": loss.item()}

    def validate(m: SASRec) -> dict[str, float]:
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
        "sasrec",
        run_defining(params.model_dump(mode="json")),
        seed,
        n_items,
        mask_history,
        sequences_fingerprint(train),
        sequences_fingerprint(valid_histories),
        list(valid_targets),
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
        desc=desc,
    )
    return model.eval(), result
