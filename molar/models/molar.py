"""Molar: MIRM item embeddings + the DUEG user model, trained with BCE + post-alignment.

The joint model (``MolarModel``) holds
- an item side: either the catalog's cached MIRM embeddings (``CachedItems``, a frozen table
  [n_items + 1, d_item], row 0 = padding; ``train.mirm_trainable: false``) or the MIRM model
  itself (``MirmItems``, which embeds the items of each batch with gradients and refreshes the
  catalog table for scoring; ``train.mirm_trainable: true``, end-to-end as in the paper);
- DUEG (molar/models/dueg.py): the backbone's decoder over the history's item vectors, the user
  vector is its final state at ``[User]`` (``dueg.kind: llm``, the paper's); or, for the paper's
  RQ2, an ID model's sequence encoder over the same item vectors (``dueg.kind: sasrec | gru4rec |
  fpmc``, ``IdDueg`` of molar/models/id_dueg.py, same interface);
- the alignment head: a linear map from DUEG's width to the ID model's when they differ
  (``align.project``);
- optionally (``dueg.item_id_embedding: true``, early ID fusion, issue 13) a learned ID embedding
  per item (``ItemIdEmbedding``) added to every item vector after the item adapter, i.e. at
  DUEG's input, before DUEG reads it: for the history inputs and for the candidates / catalog, so
  the ID signal reaches the scoring space too (as SASRec's one table both reads and scores).

Scores are ``logit_scale * cos(user, item)`` (``train.similarity: cosine``, default) or the raw
dot product. LLM final hidden states have large, uneven norms, so raw dot products saturate the
BCE sigmoid from the first step; the scaled cosine keeps logits in [-scale, scale] (HLLM also
normalises). Items are ranked by the same score the loss trains.

Training objective (``MolarObjective``; paper Eq. 3-5 and Appendix B):
``L = L_bce + align.alpha * L_align``, with ``L_bce`` point-wise BCE with negatives uniform over the
catalog minus the positive (or ``sampled_ce``: a softmax over negatives shared by the batch; or
``ce``: the full softmax over the catalog, cached items only), and ``L_align`` the symmetric InfoNCE
(cosine / tau, in-batch negatives) between DUEG user vectors and the frozen ID model's user
vectors of the same histories. With alpha = 0 the alignment term is computed for the log only,
under no_grad, so the gradient is exactly the BCE one. Every step logs both terms, the
embedding spreads and the fraction of live negatives; ``CollapseError`` stops training when the
user or item embeddings collapse (HLLM's failure, DESIGN.md section 5). The recipe that trains it
(``train_molar``) and its frozen scorer (``load_scorer``) are molar/recipes/molar.py.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from molar import losses
from molar.errors import MissingInputError, UserError
from molar.io import atomic_path
from molar.models.dueg import Dueg
from molar.models.id_dueg import IdDueg
from molar.models.id_model import left_pad  # the ID models' layout, so both models read one batch

CONFIG_FILE = "molar.json"
WEIGHTS_FILE = "model.safetensors"
DECODER_CONFIG_DIR = "decoder"  # the DUEG decoder's transformers config (config.json), dueg.kind llm
USER_MODEL_DIR = "user_model"  # the ID-model encoder's checkpoint (registry format), other dueg.kind
LIVE_NEGATIVE = 0.01  # a negative is live while its gradient weight (sigmoid / softmax share) is above this


class CollapseError(UserError):
    """User or item embeddings collapsed to (nearly) one direction; training cannot recover.

    A user error: not a bug but what these params (train.lr, train.similarity, align.alpha) led to;
    the message says which to change, and the stage prints it without a traceback."""


# ------------------------------------------------------------------------------ helpers
def spread(vectors: torch.Tensor) -> float:
    """Mean per-dimension standard deviation of the L2-normalised rows (0 = all rows point one way).

    Scale-free, so a model that merely shrinks or grows its vectors does not trip the guard.
    Random directions in d dimensions give about 1/sqrt(d).
    """
    if vectors.shape[0] < 2:
        return float("nan")
    return F.normalize(vectors.detach().float(), dim=-1).std(dim=0).mean().item()


# ----------------------------------------------------------------------------- item side
class CachedItems(nn.Module):
    """The catalog's MIRM embeddings as a fixed table (``train.mirm_trainable: false``)."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        if table.dim() != 2 or table.shape[0] < 3:
            raise ValueError(f"item table must be [n_items + 1, d] with n_items >= 2, got {tuple(table.shape)}")
        self.register_buffer("table", table.detach().float().clone())

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def vectors(self, *ids: torch.Tensor) -> list[torch.Tensor]:
        """Item vectors for each id tensor (any shape) -> [..., d_item]."""
        return [self.table[i] for i in ids]

    def refresh(self) -> None:
        """Nothing to recompute: the table is fixed."""


class MirmItems(nn.Module):
    """MIRM itself as the item side (``train.mirm_trainable: true``): gradients reach MIRM.

    ``embed(ids [N]) -> [N, d_item]`` runs MIRM on the items' prompts with gradients (the
    caller's module, registered here so the optimizer and the checkpoint see its weights);
    the catalog ``table`` is recomputed without gradients by ``refresh()`` before validation
    and scoring, and is what DUEG reads at inference.

    Both keep the items' mean where the starting catalog had it (``centre``): the batch's
    distinct items are re-centred on it, and so is the refreshed table. As MIRM trains, its
    states drift together (a shared shift far larger than what tells items apart), and the
    item adapter's fixed whitening, computed from the starting catalog, would turn that shift
    into a collapse of the items onto one point within a few steps.
    """

    def __init__(self, mirm: nn.Module, embed: Callable[[nn.Module, torch.Tensor], torch.Tensor], table: torch.Tensor, refresh_batch: int) -> None:
        super().__init__()
        self.mirm = mirm
        self._embed = embed
        self.refresh_batch = refresh_batch
        self.register_buffer("table", table.detach().float().clone())
        self.register_buffer("centre", self.table[1:].mean(0, keepdim=True).clone())

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    def vectors(self, *ids: torch.Tensor) -> list[torch.Tensor]:
        """Embed the distinct items among ``ids`` once, with gradients, and gather them per tensor."""
        flat = torch.cat([i.reshape(-1) for i in ids])
        unique, inverse = torch.unique(flat, return_inverse=True)
        real = unique[unique != 0]
        vecs = torch.zeros(unique.shape[0], self.dim, device=flat.device)
        if real.numel():
            fresh = self._embed(self.mirm, real).float()
            fresh = fresh - fresh.mean(0, keepdim=True) + self.centre
            vecs = vecs.index_put((torch.nonzero(unique != 0).squeeze(1),), fresh)
        out, start = [], 0
        for i in ids:
            n = i.numel()
            out.append(vecs[inverse[start : start + n]].view(*i.shape, self.dim))
            start += n
        return out

    @torch.no_grad()
    def refresh(self) -> None:
        was_training = self.mirm.training
        self.mirm.eval()
        try:
            ids = torch.arange(1, self.table.shape[0], device=self.table.device)
            for start in range(0, ids.numel(), self.refresh_batch):
                chunk = ids[start : start + self.refresh_batch]
                self.table[chunk] = self._embed(self.mirm, chunk).float()
            self.table[1:] += self.centre - self.table[1:].mean(0, keepdim=True)
        finally:
            self.mirm.train(was_training)


# ------------------------------------------------------------------- early ID fusion
class ItemIdEmbedding(nn.Module):
    """Learned per-item ID vectors added to the adapted item vectors (``dueg.item_id_embedding``).

    ``inputs`` [n_items + 1, d_in] is added to the history items after ``dueg.project_items`` (the
    width DUEG reads, so it fits every ``dueg.kind``); ``candidates`` [n_items + 1, hidden] to the
    scored items after ``dueg.project_candidates`` when the user model has its own candidate map
    (FPMC's untied output side), else the candidates use ``inputs`` too (one item space, as the
    tied adapter). Row 0 (padding) is zero and stays zero (``padding_idx``: no gradient).

    Init: normal with std ``0.02 x`` the RMS of the adapted catalog vectors at its side, i.e. 2% of
    the content's scale: small enough that training starts from the content-only model (the ID
    part only perturbs the first scores, nothing to unlearn), large enough (not zero) that the
    items' ID vectors differ from the start and each gets its own gradient direction.
    """

    def __init__(self, n_items: int, input_dim: int, candidate_dim: int | None = None,
                 input_scale: float = 0.0, candidate_scale: float = 0.0) -> None:
        super().__init__()
        self.inputs = self._table(n_items, input_dim, input_scale)
        self.candidates = None if candidate_dim is None else self._table(n_items, candidate_dim, candidate_scale)

    @staticmethod
    def _table(n_items: int, dim: int, scale: float) -> nn.Embedding:
        table = nn.Embedding(n_items + 1, dim, padding_idx=0)
        with torch.no_grad():
            table.weight.normal_(0.0, 0.02 * scale)
            table.weight[0].zero_()
        return table

    def add_inputs(self, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return vectors + self.inputs(ids).to(vectors.dtype)

    def add_candidates(self, ids: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        table = self.inputs if self.candidates is None else self.candidates
        return vectors + table(ids).to(vectors.dtype)

    @classmethod
    def for_user_model(cls, dueg: "Dueg | IdDueg", catalog: torch.Tensor) -> "ItemIdEmbedding":
        """Tables of the widths and init scales ``dueg``'s adapters give ``catalog`` [n_items + 1, d_item]."""
        with torch.no_grad():
            inputs = dueg.project_items(catalog[1:].float())
            untied = getattr(dueg, "candidate_proj", None) is not None
            cands = dueg.project_candidates(catalog[1:].float()) if untied else None
        rms = lambda x: x.pow(2).mean().sqrt().item()
        return cls(catalog.shape[0] - 1, inputs.shape[-1], None if cands is None else cands.shape[-1],
                   rms(inputs), 0.0 if cands is None else rms(cands))


# ---------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class MolarConfig:
    n_items: int
    item_dim: int  # MIRM's embedding width
    hidden_size: int  # DUEG's width (the scoring space)
    id_dim: int | None  # the ID model's user-vector width (alignment target); None = no head
    max_length: int  # history items DUEG sees (most recent)
    similarity: str = "cosine"  # cosine | dot
    logit_scale: float = 10.0
    item_adapter: str = "auto"  # auto | linear | whiten | mlp (molar.models.dueg.item_adapter_for)
    dueg_kind: str = "llm"  # llm: the LLM decoder (Dueg) | an ID model's name: its encoder (IdDueg)
    item_id_embedding: bool = False  # early ID fusion (ItemIdEmbedding); checkpoints without it: False

    def __post_init__(self) -> None:
        if self.similarity not in ("cosine", "dot"):
            raise ValueError(f"train.similarity must be cosine or dot, got {self.similarity!r}")


class MolarModel(nn.Module):
    def __init__(
        self, config: MolarConfig, dueg: Dueg | IdDueg, items: CachedItems | MirmItems, align_head: nn.Module | None = None,
        item_ids: ItemIdEmbedding | None = None,
    ) -> None:
        super().__init__()
        if (item_ids is not None) != config.item_id_embedding:
            raise ValueError(f"MolarConfig item_id_embedding {config.item_id_embedding} disagrees with the ID table ({item_ids is not None})")
        if isinstance(dueg, Dueg) != (config.dueg_kind == "llm"):
            raise ValueError(f"MolarConfig dueg_kind {config.dueg_kind!r} disagrees with the user model ({type(dueg).__name__})")
        if items.dim != config.item_dim or dueg.hidden_size != config.hidden_size:
            raise ValueError(f"MolarConfig widths {config.item_dim}/{config.hidden_size} disagree with the modules ({items.dim}/{dueg.hidden_size})")
        if items.table.shape[0] != config.n_items + 1:
            raise ValueError(f"item table has {items.table.shape[0]} rows, expected n_items + 1 = {config.n_items + 1}")
        self.config = config
        self.dueg = dueg
        self.items = items
        self.align_head = align_head if align_head is not None else nn.Identity()
        self.item_ids = item_ids  # a submodule only when on: without it the state dict is today's

    # --------------------------------------------------------------- embeddings
    def encode(self, padded: torch.Tensor, item_vectors: torch.Tensor, user_columns: torch.Tensor) -> torch.Tensor:
        """User vectors [B, U, hidden] after ``user_columns`` of left-padded histories [B, L].

        ``item_vectors`` [B, L, d_item] are the histories' MIRM item vectors (any value at padding).
        """
        return self.dueg(self._inputs(padded, item_vectors), padded != 0, user_columns)

    def _inputs(self, ids: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """History items in DUEG's input space (+ their ID vectors with early fusion)."""
        x = self.dueg.project_items(item_vectors)
        return x if self.item_ids is None else self.item_ids.add_inputs(ids, x)

    def _candidates(self, ids: torch.Tensor, item_vectors: torch.Tensor) -> torch.Tensor:
        """Scored items in the scoring space (+ their ID vectors with early fusion)."""
        x = self.dueg.project_candidates(item_vectors)
        return x if self.item_ids is None else self.item_ids.add_candidates(ids, x)

    def forward(self, inputs: torch.Tensor, columns: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training step's trainable computation (everything with parameters), so that a
        DistributedDataParallel wrapper sees it all in its forward and synchronises the gradients.

        ``inputs`` [B, L] left-padded histories, ``columns`` [U] the columns after which a
        ``[User]`` reads, ``pos`` [P] and ``neg`` [P or 1, k] item ids. Returns ``users`` [B, U,
        hidden], ``pos_items`` [P, hidden], ``neg_items`` [P or 1, k, hidden], ``aligned`` [B, U,
        id_dim] (the users through the alignment head) and, with a co-trained ID model,
        ``id_hidden`` [B, L', d] (its states over the last L' <= L columns) and ``id_items``.
        """
        hist_vecs, pos_vecs, neg_vecs = self.items.vectors(inputs, pos, neg)
        users = self.encode(inputs, hist_vecs, columns)
        out = {
            "users": users,
            "pos_items": self._candidates(pos, pos_vecs),
            "neg_items": self._candidates(neg, neg_vecs),
            "aligned": self.align_head(users),
        }
        id_model = getattr(self, "id_model", None)
        if id_model is not None:
            out["id_hidden"] = id_model.encode(inputs[:, -int(id_model.max_length) :])
            out["id_items"] = id_model.item_embeddings()
        return out

    def catalog_vectors(self) -> torch.Tensor:
        """Every item in the scoring space [n_items + 1, hidden] (row 0 = padding, never ranked)."""
        table = self.items.table
        return self._candidates(torch.arange(table.shape[0], device=table.device), table)

    def logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of users [..., d] against items [..., d] (broadcast, last dim reduced)."""
        if self.config.similarity == "cosine":
            users, items = F.normalize(users, dim=-1), F.normalize(items, dim=-1)
            return self.config.logit_scale * (users * items).sum(-1)
        return (users * items).sum(-1)

    def shared_logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of users [P, d] against one candidate list for all [k, d] -> [P, k], as one matmul:
        ``logits`` on [P, 1, d] x [1, k, d] would materialise a [P, k, d] product (sampled_ce with
        256 negatives: 1 GB per step on ML-1M; the whole catalog of ``train.loss: ce``: 13 GB)."""
        if self.config.similarity == "cosine":
            return self.config.logit_scale * F.normalize(users, dim=-1) @ F.normalize(items, dim=-1).T
        return users @ items.T

    def user_vectors(self, histories: Sequence[Sequence[int]], batch_size: int = 256) -> torch.Tensor:
        """The user vector after each whole history [B, hidden] (inference: table item vectors).

        Runs ``batch_size`` histories per decoder pass, so memory stays bounded for any B.
        """
        device = self.items.table.device
        parts = []
        for start in range(0, len(histories), batch_size):
            padded = left_pad(histories[start : start + batch_size], self.config.max_length).to(device)
            last = torch.tensor([padded.shape[1] - 1], device=device)
            parts.append(self.encode(padded, self.items.table[padded], last)[:, 0])
        if not parts:
            return torch.zeros(0, self.config.hidden_size, device=device)
        return torch.cat(parts)

    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """Scores of every item for each history [B, n_items + 1] (column 0 = padding)."""
        users = self.user_vectors(histories)
        catalog = self.catalog_vectors()
        if self.config.similarity == "cosine":
            return self.config.logit_scale * F.normalize(users, dim=-1) @ F.normalize(catalog, dim=-1).T
        return users @ catalog.T

    # -------------------------------------------------------------- persistence
    def save_pretrained(self, directory: str | Path, extra: dict | None = None) -> None:
        """``molar.json`` + ``model.safetensors`` (DUEG, heads, the catalog item table) + the
        decoder's transformers config (``dueg.kind: llm``) or the ID-model encoder's own checkpoint
        (other kinds: its weights live there only), written atomically as one directory. MIRM's own
        weights (end-to-end mode) and a co-trained ID model are not part of it: scoring needs only
        DUEG and the refreshed item table."""
        skip = ("items.mirm.", "items.centre", "id_model.", "dueg.encoder.")  # scoring reads the table; the encoder has its own checkpoint
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(skip)}
        user_model = {"decoder_class": type(self.dueg.decoder).__name__} if isinstance(self.dueg, Dueg) else {}
        meta = {"model": "molar", **asdict(self.config), **user_model, **(extra or {})}
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            if isinstance(self.dueg, Dueg):
                self.dueg.decoder.config.save_pretrained(tmp / DECODER_CONFIG_DIR)
            else:
                self.dueg.save_encoder(tmp / USER_MODEL_DIR)
            save_file(state, str(tmp / WEIGHTS_FILE))
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "MolarModel":
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        if not config_path.exists() or not weights_path.exists():
            raise MissingInputError(f"{directory}: no Molar checkpoint ({CONFIG_FILE} + {WEIGHTS_FILE}); run `molar train-molar` first")
        meta = json.loads(config_path.read_text())
        if meta.get("model") != "molar":
            raise UserError(f"{config_path}: not a Molar checkpoint")
        # a checkpoint from before dueg.kind has no dueg_kind: the LLM decoder, the only kind then
        config = MolarConfig(**{k: meta[k] for k in MolarConfig.__dataclass_fields__ if k in meta})
        state = load_file(str(weights_path), device="cpu")
        items = CachedItems(state["items.table"])
        if config.dueg_kind == "llm":
            decoder_config = AutoConfig.from_pretrained(directory / DECODER_CONFIG_DIR, local_files_only=True)
            decoder = AutoModel.from_config(decoder_config, attn_implementation="sdpa")
            dueg = Dueg(decoder, config.item_dim, item_adapter=config.item_adapter)
        else:
            dueg = IdDueg.from_pretrained(directory / USER_MODEL_DIR, config.item_dim, config.item_adapter)
            state.update({f"dueg.encoder.{k}": v for k, v in dueg.encoder.state_dict().items()})
        item_ids = None
        if config.item_id_embedding:  # shapes from the checkpoint, weights loaded below
            cands = state.get("item_ids.candidates.weight")
            item_ids = ItemIdEmbedding(config.n_items, state["item_ids.inputs.weight"].shape[1], None if cands is None else cands.shape[1])
        model = cls(config, dueg, items, align_head_for(config.hidden_size, config.id_dim, project=True), item_ids)
        model.load_state_dict(state)
        return model.to(device).eval()


def build_model(
    decoder: nn.Module | None,
    items: CachedItems | MirmItems,
    params,  # molar.config.Params (train, align, dueg and, for dueg.kind other than llm, that ID model's sections are read)
    id_dim: int | None,
    user_embedding: torch.Tensor | None = None,
) -> MolarModel:
    """The user model of ``dueg.kind`` + the item side + the alignment head: DUEG on ``decoder``
    (its first ``dueg.layers`` blocks) for ``llm``, else a fresh encoder of that ID model (from its
    params section; ``decoder`` and ``user_embedding`` unused, pass None)."""
    from molar.models.dueg import keep_first_layers

    t, d = params.train, params.dueg
    table = items.table
    n_items, item_dim = table.shape[0] - 1, table.shape[1]
    if d.kind == "llm":
        if decoder is None:
            raise ValueError("dueg.kind llm needs the backbone's decoder")
        dueg = Dueg(keep_first_layers(decoder, d.layers), item_dim, user_embedding, item_adapter=d.item_adapter, catalog=table[1:])
    else:
        dueg = IdDueg.fresh(d.kind, getattr(params, d.kind), n_items, item_dim, t.max_length, d.item_adapter, catalog=table[1:])
    config = MolarConfig(
        n_items=n_items, item_dim=item_dim, hidden_size=dueg.hidden_size, id_dim=id_dim,
        max_length=t.max_length, similarity=t.similarity, logit_scale=t.logit_scale, item_adapter=d.item_adapter,
        dueg_kind=d.kind, item_id_embedding=d.item_id_embedding,
    )
    head = align_head_for(dueg.hidden_size, id_dim, params.align.project)
    # built last and only when on: with the flag off the init draws exactly what it drew before
    item_ids = ItemIdEmbedding.for_user_model(dueg, table) if d.item_id_embedding else None
    return MolarModel(config, dueg, items, head, item_ids)


def align_head_for(hidden_size: int, id_dim: int | None, project: bool) -> nn.Module:
    """Identity when DUEG and the ID model agree on the width, else a learned linear map."""
    if id_dim is None or id_dim == hidden_size:
        return nn.Identity()
    if not project:
        raise UserError(
            f"DUEG user vectors have {hidden_size} dims, the ID model's have {id_dim}: set align.project: true "
            "to learn a linear projection, or give the ID model the same width"
        )
    return nn.Linear(hidden_size, id_dim, bias=False)


# ---------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class ObjectiveSettings:
    n_items: int
    loss: str = "bce"  # bce | sampled_ce | ce (full softmax over the catalog)
    num_negatives: int = 1
    all_positions: bool = True
    alpha: float = 0.1
    tau: float = 0.1
    align_positions: str = "last"  # last | all
    collapse_std: float = 1e-4


class MolarObjective:
    """``compute_loss(model, batch) -> (loss, logs)`` for ``molar.train.fit``.

    ``batch``: ``{"inputs": [B, L], "targets": [B, L]}`` left-padded next-item pairs (SASRec's
    layout), plus ``"step"`` (an int, the micro-batch's global index) for the per-step log.
    ``id_model``: the ID model (``SequentialRecommender``) whose user vectors DUEG is aligned to;
    frozen (kept in eval mode, never a submodule of ``MolarModel``) unless ``co_train``, in which
    case it is ``model.id_model`` and also gets its own next-item loss (``id_loss``).
    ``on_step(step, logs)`` receives every micro-batch's logs (e.g. ``StepLog.append``).
    """

    def __init__(
        self,
        settings: ObjectiveSettings,
        id_model: nn.Module | None,
        on_step: Callable[[int, dict[str, float]], None] | None = None,
        co_train: bool = False,
        id_loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,  # (hidden, targets, items)
    ) -> None:
        if settings.loss not in ("bce", "sampled_ce", "ce"):
            raise ValueError(f"train.loss must be bce, sampled_ce or ce, got {settings.loss!r}")
        if settings.align_positions not in ("last", "all"):
            raise ValueError(f"align.positions must be last or all, got {settings.align_positions!r}")
        if settings.alpha > 0 and id_model is None and not co_train:
            raise ValueError("align.alpha > 0 needs an ID model to align to")
        if co_train and id_loss is None:
            raise ValueError("co-training the ID model needs its own next-item loss (id_loss)")
        self.settings = settings
        self.frozen_id_model = None if co_train else id_model
        if self.frozen_id_model is not None:
            self.frozen_id_model.eval().requires_grad_(False)
        self.co_train = co_train
        self.id_loss = id_loss
        self.on_step = on_step

    def __call__(self, model: MolarModel, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        s = self.settings
        inputs, targets = batch["inputs"], batch["targets"]
        b, length = inputs.shape
        device = inputs.device
        if s.all_positions:
            columns = torch.arange(length, device=device)
        else:
            columns = torch.tensor([length - 1], device=device)
        col_targets = targets[:, columns]  # [B, U]
        keep = col_targets != 0
        pos = col_targets[keep]  # [P]
        if pos.numel() == 0:
            raise ValueError("a training batch has no next-item target: every sequence needs at least 2 items")

        # negatives first: in end-to-end mode MIRM embeds inputs, positives and negatives in one pass
        if s.loss == "bce":
            neg = losses.uniform_negatives(pos, s.n_items, s.num_negatives)  # [P, k]
        elif s.loss == "ce":  # full softmax: every catalog item a negative (the positive's own column masked)
            neg = torch.arange(1, s.n_items + 1, device=device).unsqueeze(0)  # [1, n_items]
        else:
            k = min(s.num_negatives, s.n_items)
            neg = (torch.randperm(s.n_items, device=device)[:k] + 1).unsqueeze(0)  # [1, k] shared by the batch
        core = getattr(model, "module", model)  # the MolarModel inside a DDP wrapper
        out = model(inputs, columns, pos, neg)  # through the wrapper: gradients are synchronised
        users_all = out["users"]  # [B, U, hidden]
        users = users_all[keep]  # [P, hidden]
        pos_items, neg_items = out["pos_items"], out["neg_items"]  # [P, hidden], [P or 1, k, hidden]
        pos_logit = core.logits(users, pos_items)  # [P]
        if neg_items.shape[0] == 1:  # one list shared by the batch (sampled_ce, ce)
            neg_logit = core.shared_logits(users, neg_items[0])  # [P, k]
        else:
            neg_logit = core.logits(users.unsqueeze(1), neg_items)  # [P, k]
        if s.loss == "bce":
            rec_loss = losses.pointwise_bce(pos_logit, neg_logit)
            live = (torch.sigmoid(neg_logit.detach().float()) > LIVE_NEGATIVE).float().mean().item()
        else:
            same = neg == pos.unsqueeze(1)  # [P, k]
            rec_loss = losses.sampled_softmax_ce(pos_logit, neg_logit, same)
            share = torch.softmax(torch.cat([pos_logit.unsqueeze(1), neg_logit.masked_fill(same, float("-inf"))], 1).detach().float(), 1)[:, 1:]
            live = (share > LIVE_NEGATIVE / (neg_logit.shape[1] + 1)).float().mean().item()

        loss = rec_loss
        logs: dict[str, float] = {}
        theirs = self._id_users(out, inputs, columns, keep)
        if theirs is not None:
            # with alpha = 0 the term is only logged: no graph, so the gradient is exactly the BCE one
            with torch.set_grad_enabled(torch.is_grad_enabled() and s.alpha > 0):
                ours = out["aligned"][:, -1] if s.align_positions == "last" else out["aligned"][keep]
                align_loss = losses.symmetric_info_nce(ours, theirs, s.tau)
            if s.alpha > 0:
                loss = loss + s.alpha * align_loss
            logs["align"] = align_loss.item()
        if self.co_train:
            id_hidden = out["id_hidden"]
            id_loss = self.id_loss(id_hidden, targets[:, -id_hidden.shape[1] :], out["id_items"])
            loss = loss + id_loss
            logs["id_loss"] = id_loss.item()

        item_vecs = torch.cat([pos_items.detach(), neg_items.detach().reshape(-1, pos_items.shape[-1])])
        logs = {"loss": loss.item(), s.loss: rec_loss.item(), **logs}
        logs.update({"user_std": spread(users), "item_std": spread(item_vecs), "live_negatives": live})
        if self.on_step is not None:
            self.on_step(int(batch.get("step", -1)), logs)
        for name in ("user_std", "item_std"):
            if logs[name] < s.collapse_std:
                raise CollapseError(
                    f"train-molar: {name.split('_')[0]} embeddings collapsed at step {batch.get('step')}: their spread "
                    f"(mean per-dimension std of the normalised vectors) is {logs[name]:.2e} < train.collapse_std "
                    f"{s.collapse_std:g} (random directions give ~{1 / math.sqrt(users.shape[-1]):.2g}). "
                    "Lower train.lr, use train.similarity: cosine, or lower align.alpha; the per-step log is in "
                    "metrics/molar_train/steps.csv"
                )
        return loss, logs

    def _id_users(self, out: dict, inputs: torch.Tensor, columns: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """The ID model's user vectors for the DUEG users being aligned (None without an ID model):
        the whole history's (``align.positions: last``) or every kept prefix's (``all``)."""
        if self.co_train:
            hidden = out["id_hidden"]  # computed in the model's forward, with gradients
        elif self.frozen_id_model is not None:
            id_model = self.frozen_id_model
            if next(id_model.parameters()).device != inputs.device:
                id_model.to(inputs.device)
            with torch.no_grad():
                hidden = id_model.encode(inputs[:, -int(id_model.max_length) :])
        else:
            return None
        if self.settings.align_positions == "last":
            return hidden[:, -1]  # the last column is always a real item
        if hidden.shape[1] < inputs.shape[1]:
            raise UserError(
                f"align.positions: all needs train.max_length ({inputs.shape[1]}) <= the ID model's max_length "
                f"({hidden.shape[1]}) so both models see the same prefixes"
            )
        return hidden[:, columns][keep]


# ------------------------------------------------------------------------------ batches
class MolarBatches:
    """Epoch ``e``'s batches as dicts for ``fit``: SASRec's next-item pairs + a global step index.

    ``pairs(epoch)`` yields ``(inputs, targets)`` (e.g. ``molar.recipes.id_models.NextItemBatches``);
    the step index (epoch * batches_per_epoch + i) keys the per-step log so that a resumed run
    overwrites, rather than duplicates, the steps it replays.
    """

    def __init__(self, pairs: Callable[[int], object], batches_per_epoch: int) -> None:
        self.pairs = pairs
        self.batches_per_epoch = batches_per_epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __call__(self, epoch: int):
        for i, (inputs, targets) in enumerate(self.pairs(epoch)):
            yield {"inputs": inputs, "targets": targets, "step": epoch * self.batches_per_epoch + i}


class StepLog:
    """Per-step training log that survives resume: ``state_dir/steps-<run_key>.csv``, appended per
    micro-batch; a replayed step (after a resume) overwrites its earlier row when read back."""

    FIELDS = ("step", "loss", "bce", "sampled_ce", "ce", "align", "id_loss", "user_std", "item_std", "live_negatives")

    def __init__(self, state_dir: str | Path, run_key: str) -> None:
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        self.path = state_dir / f"steps-{run_key}.csv"
        for old in state_dir.glob("steps-*.csv"):  # logs of runs with other params
            if old != self.path:
                old.unlink()
        if not self.path.exists():
            self.path.write_text(",".join(self.FIELDS) + "\n")

    def append(self, step: int, logs: dict[str, float]) -> None:
        row = [str(step)] + [f"{logs[k]:.6g}" if k in logs else "" for k in self.FIELDS[1:]]
        with self.path.open("a") as f:
            f.write(",".join(row) + "\n")

    def rows(self) -> list[dict[str, str]]:
        """One row per step, last write wins, in step order; columns nobody logged are dropped."""
        with self.path.open() as f:
            by_step = {int(r["step"]): r for r in csv.DictReader(f) if r.get("step") not in (None, "")}
        rows = [by_step[k] for k in sorted(by_step)]
        used = [k for k in self.FIELDS if any(r.get(k) for r in rows)]
        return [{k: r[k] for k in used} for r in rows]


def rows_to_csv(rows: list[dict], path: str | Path) -> None:
    """Write dict rows as CSV atomically (plot data for dvc)."""
    with atomic_path(path) as tmp:
        if not rows:
            tmp.write_text("")
            return
        fields = list(rows[0])
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
