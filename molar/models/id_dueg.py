"""An ID model's sequence encoder as Molar's user model (``dueg.kind: sasrec | gru4rec | fpmc``).

Paper RQ2 (Figure 3) replaces the LLM user model by FPMC, SASRec or GRU4Rec and keeps the rest of
Molar: the MIRM item embeddings, the objective (BCE + post-alignment), the scoring. ``IdDueg``
has DUEG's interface (``hidden_size``, ``project_items``, ``project_candidates``, ``forward(item_inputs,
real, user_columns)``, molar/models/dueg.py) and runs a freshly initialised ID model of the
registry over the history's MIRM item vectors through its ``encode_vectors`` (causal and
padding-invariant by the ``SequentialRecommender`` contract); the user vector after column c is
the encoder's output at c.

Item tables. The ID model reads and scores item vectors, here produced from MIRM vectors by the
learned item adapter (``dueg.item_adapter``, ``item_adapter_for``) instead of its ID tables, so
those tables are never read: the encoder is built for a catalog of one item (two-row tables,
frozen, as DUEG's dropped token table) whatever the catalog. The parameters ``encode_vectors``
does not read are frozen (no optimizer state, no unused DDP parameter).

Inputs and candidates follow the ID model's own tying. SASRec and GRU4Rec score with the table
they read (``item_embeddings()[i] == input_vectors(i)``): one adapter gives both the history
inputs and the candidates, as DUEG does. FPMC reads ``[H_i ; LI_i]`` (history and last-item
factors) and scores ``[IU_j ; IL_j]``, separate tables; with one adapter its transition term
would be the symmetric ``<LI_l, LI_j>`` and could not tell l -> j from j -> l (nor keep the last
item itself from scoring highest), which is the point of the Markov chain. So an untied model gets
a second adapter of the same kind for the candidates (``project_candidates``), the analogue of its
separate output tables over content; scoring (Molar's cosine or dot) is unchanged. On a
deterministic successor rule (tests/test_id_dueg.py) FPMC reaches recall@1 1.0 with its own
candidate adapter and 0.3 with the inputs' adapter shared.

Whitening scale (``whiten``): the RMS of the ID model's own input (resp. output) item vectors at
initialisation for this catalog's size (e.g. SASRec's Xavier-normal table), so items enter the
encoder at the scale its layers expect, as DUEG uses the decoder's token-embedding scale.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from molar.errors import UserError
from molar.models.dueg import item_adapter_for
from molar.models.id_model import SequentialRecommender
from molar.models.registry import id_model_class, load_id_model

ENCODER_ITEMS = 1  # the catalog size the encoder is built for: its item tables are never read


class IdDueg(nn.Module):
    """An ID model's ``encode_vectors`` over adapted MIRM item vectors; ``forward`` gives user vectors."""

    def __init__(
        self,
        encoder: SequentialRecommender,
        item_dim: int,
        item_adapter: str = "auto",
        catalog: torch.Tensor | None = None,
        input_scale: float = 1.0,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        input_dim, self.hidden_size, tied = _probe(encoder)
        self.encoder = encoder
        self.item_proj = item_adapter_for(item_dim, input_dim, item_adapter, catalog, input_scale)
        self.candidate_proj = None if tied else item_adapter_for(item_dim, self.hidden_size, item_adapter, catalog, output_scale)

    @classmethod
    def fresh(
        cls,
        kind: str,
        section,  # the ID model's params section (molar.config.IdModelParams subclass), e.g. params.sasrec
        n_items: int,
        item_dim: int,
        history_length: int,
        item_adapter: str,
        catalog: torch.Tensor | None = None,
    ) -> "IdDueg":
        """A randomly initialised ``kind`` encoder (its ``from_params``, torch's global RNG) for
        histories of ``history_length`` items (``train.max_length``) over ``n_items`` items."""
        model_class = id_model_class(kind)
        if history_length > section.max_length:
            raise UserError(
                f"dueg.kind {kind}: train.max_length ({history_length}) > {kind}.max_length ({section.max_length}), "
                f"the longest history the {kind} encoder reads; raise {kind}.max_length or lower train.max_length"
            )
        with torch.random.fork_rng(devices=[]):  # measuring the init scale leaves the encoder's init as it was
            full = model_class.from_params(n_items, section)
            with torch.no_grad():
                ids = torch.arange(1, n_items + 1)
                input_scale = _rms(full.input_vectors(ids.unsqueeze(0)))
                output_scale = _rms(full.item_embeddings()[1:])
            del full
        encoder = model_class.from_params(ENCODER_ITEMS, section)
        return cls(encoder, item_dim, item_adapter, catalog, input_scale, output_scale)

    @classmethod
    def from_pretrained(cls, directory: str | Path, item_dim: int, item_adapter: str) -> "IdDueg":
        """The encoder saved by ``save_encoder`` (an ID-model checkpoint) around fresh adapters; the
        caller loads the adapters' weights (Molar's model.safetensors)."""
        return cls(load_id_model(directory), item_dim, item_adapter)

    def save_encoder(self, directory: str | Path) -> None:
        """The encoder as a regular ID-model checkpoint (``load_id_model`` reads it)."""
        self.encoder.save_pretrained(directory)

    def project_items(self, item_vectors: torch.Tensor) -> torch.Tensor:
        """MIRM item vectors [..., item_dim] -> the encoder's input vectors [..., d_in]."""
        return self.item_proj(item_vectors)

    def project_candidates(self, item_vectors: torch.Tensor) -> torch.Tensor:
        """MIRM item vectors [..., item_dim] -> the scoring space [..., hidden_size] (the input map
        when the ID model ties its input and output tables, else its own learned map)."""
        return self.item_proj(item_vectors) if self.candidate_proj is None else self.candidate_proj(item_vectors)

    def item_adapter_parameters(self) -> list[nn.Parameter]:
        """The item adapters' learned weights, inputs' and candidates' (``train.item_adapter_lr_scale``)."""
        adapters = [self.item_proj] + ([] if self.candidate_proj is None else [self.candidate_proj])
        return [p for adapter in adapters for p in adapter.parameters()]

    def forward(self, item_inputs: torch.Tensor, real: torch.Tensor, user_columns: torch.Tensor) -> torch.Tensor:
        """User vectors [B, U, hidden_size]: the encoder's output after each of ``user_columns``.

        ``item_inputs`` [B, L, d_in] are projected item vectors of the left-padded histories (any
        value at padding), ``real`` [B, L] marks real items.
        """
        return self.encoder.encode_vectors(item_inputs, real)[:, user_columns]


def _rms(x: torch.Tensor) -> float:
    return x.detach().float().pow(2).mean().sqrt().item()


def _probe(encoder: SequentialRecommender) -> tuple[int, int, bool]:
    """(input width, output width, tied) of ``encoder``, and freeze what ``encode_vectors`` never reads.

    ``tied``: the model scores with the vectors it reads (``item_embeddings()[i]`` equals
    ``input_vectors(i)``, true by construction for a shared table, false for separately
    initialised random tables). Runs in eval mode (no dropout, no RNG draw).
    """
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            ids = torch.arange(1, encoder.n_items + 1).unsqueeze(0)
            inputs = encoder.input_vectors(ids)
            outputs = encoder.item_embeddings()[ids]
        trainable = [p for p in encoder.parameters() if p.requires_grad]
        with torch.enable_grad():
            probe = torch.ones(1, 2, inputs.shape[-1], requires_grad=True)
            states = encoder.encode_vectors(probe, torch.ones(1, 2, dtype=torch.bool))
            grads = torch.autograd.grad(states.sum(), [probe, *trainable], allow_unused=True)
    finally:
        encoder.train(was_training)
    for p, g in zip(trainable, grads[1:]):
        if g is None:
            p.requires_grad_(False)
    tied = inputs.shape == outputs.shape and torch.equal(inputs, outputs)
    return int(inputs.shape[-1]), int(states.shape[-1]), tied
