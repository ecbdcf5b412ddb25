"""DUEG, the Dynamic User Embedding Generator of Molar: an LLM decoder over item embeddings.

The decoder stack of the backbone (``Qwen2VLTextModel`` for Qwen2-VL, the base model of a
text-only causal LM such as SmolLM2's ``LlamaModel``) is fed ``inputs_embeds`` built from the
history's item embeddings (MIRM's ``[Cur_Item]`` states through the item map
``dueg.item_adapter``, see ``item_adapter_for``), followed by a learned ``[User]`` embedding. The
user embedding is the decoder's final hidden state at ``[User]``. There is no word-embedding
layer: the decoder's token table is replaced by a single unused row, and ``[User]`` is a
parameter of its own, initialised from the backbone's ``[User]`` token embedding when it has one.
The item map also gives the candidate items of the score, so inputs and candidates live in one
space, as in SASRec's shared item table.

Every prefix, one ``[User]`` token, one forward pass
---------------------------------------------------
Training every history position causally (``train.all_positions``) needs the user embedding
after each prefix ``i_1..i_t``, i.e. the state at a ``[User]`` token that follows ``i_t``.
HLLM instead reads the hidden state *at each item* as the user state; then training never sees
the ``[User]`` token that inference uses, so the two disagree. We keep the paper's definition
exactly: the sequence is ``[i_1 .. i_L, U_1 .. U_L]`` where ``U_t`` is a copy of ``[User]`` that
(by a 4D attention mask) attends to ``i_1..i_t`` and to itself only, at position id ``t`` (the
position right after ``i_t``), while items attend causally to earlier items only and never to
a ``U``. In a causal decoder an item's state depends only on earlier items, so ``U_t``'s final
state equals what the single-``[User]`` sequence ``[i_1 .. i_t, U]`` gives, bit for bit up to
floating point (tests/test_dueg.py checks it), at the cost of one pass over 2L tokens instead
of L passes. With ``user_columns = [L - 1]`` the same code is the plain ``[i_1 .. i_L, U]``
inference pass.

Histories are left-padded (0 = padding, the last column is the most recent item), as SASRec's;
position ids count real items only, so the result does not depend on the amount of padding.
"""

from __future__ import annotations

import torch
from torch import nn

from molar.errors import UserError
from molar.models.whitening import ItemWhitening

USER_TOKEN = "[User]"

# Attention kernels that take an arbitrary 4D mask: sdpa takes a boolean one (True = attend),
# eager adds a float one. Flash-attention kernels only know causal/padding masks.
_BOOL_MASK_ATTENTION = {"sdpa"}
_FLOAT_MASK_ATTENTION = {"eager"}


def prefix_user_layout(real: torch.Tensor, user_columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention and positions for ``[items (L), User copies (U)]``.

    ``real`` [B, L] marks real item columns; ``user_columns`` [U] (long) says after which item
    column each ``[User]`` copy stands. Returns ``allowed`` [B, S, S] (bool, S = L + U, query x
    key, True = may attend) and ``position_ids`` [B, S]. Every token attends to itself, so no
    softmax row is empty (padding rows are never read).
    """
    b, length = real.shape
    u = user_columns.numel()
    dev = real.device
    cols = torch.arange(length, device=dev)
    seen = real.long().cumsum(1)  # [B, L] real items up to and including each column
    item_pos = (seen - 1).clamp(min=0)
    user_pos = seen[:, user_columns]  # the User after column c sits right after the c-th real item

    # items: key j is a real item at or before query i, and the query is a real item
    item_item = (cols.view(1, 1, -1) <= cols.view(1, -1, 1)) & real.unsqueeze(1) & real.unsqueeze(2)
    # User copy for column c: real items at or before c (none if column c itself is padding)
    user_item = (cols.view(1, 1, -1) <= user_columns.view(1, -1, 1)) & real.unsqueeze(1) & real[:, user_columns].unsqueeze(2)
    allowed = torch.zeros(b, length + u, length + u, dtype=torch.bool, device=dev)
    allowed[:, :length, :length] = item_item
    allowed[:, length:, :length] = user_item
    allowed |= torch.eye(length + u, dtype=torch.bool, device=dev)
    return allowed, torch.cat([item_pos, user_pos], dim=1)


class Dueg(nn.Module):
    """Decoder + ``[User]`` embedding + input projection; ``forward`` gives user vectors."""

    def __init__(
        self,
        decoder: nn.Module,
        item_dim: int,
        user_embedding: torch.Tensor | None = None,
        item_adapter: str = "auto",
        catalog: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        config = decoder.config
        impl = getattr(config, "_attn_implementation", None) or "eager"
        if impl not in _BOOL_MASK_ATTENTION | _FLOAT_MASK_ATTENTION:
            raise ValueError(
                f"DUEG needs an attention kernel that takes a 4D mask (sdpa or eager), the decoder uses {impl!r}; "
                "load the backbone with attn_implementation='sdpa'"
            )
        self.hidden_size = int(config.hidden_size)
        input_scale = _token_embedding_rms(decoder)  # before the table goes
        _drop_word_embeddings(decoder)
        self.decoder = decoder
        self.item_proj = item_adapter_for(item_dim, self.hidden_size, item_adapter, catalog, input_scale)
        if user_embedding is None:
            user_embedding = torch.randn(self.hidden_size) * float(getattr(config, "initializer_range", 0.02))
        if user_embedding.shape != (self.hidden_size,):
            raise ValueError(f"[User] embedding has shape {tuple(user_embedding.shape)}, expected ({self.hidden_size},)")
        self.user_token = nn.Parameter(user_embedding.detach().clone().float())

    @property
    def uses_bool_mask(self) -> bool:
        return self.decoder.config._attn_implementation in _BOOL_MASK_ATTENTION

    def project_items(self, item_vectors: torch.Tensor) -> torch.Tensor:
        """MIRM item vectors [..., item_dim] -> the decoder's input / scoring space [..., hidden]."""
        return self.item_proj(item_vectors)

    def project_candidates(self, item_vectors: torch.Tensor) -> torch.Tensor:
        """The items being scored: the same map as the inputs (one item space, as SASRec's shared table)."""
        return self.item_proj(item_vectors)

    def item_adapter_parameters(self) -> list[nn.Parameter]:
        """The item adapter's learned weights (``train.item_adapter_lr_scale`` sets their lr)."""
        return list(self.item_proj.parameters())

    def forward(self, item_inputs: torch.Tensor, real: torch.Tensor, user_columns: torch.Tensor) -> torch.Tensor:
        """User vectors [B, U, hidden]: the final state of a ``[User]`` after each of ``user_columns``.

        ``item_inputs`` [B, L, hidden] are projected item vectors of the left-padded histories
        (padding rows are zeroed here), ``real`` [B, L] marks real items.
        """
        b, length, _ = item_inputs.shape
        dtype = self.decoder.get_input_embeddings().weight.dtype
        user = self.user_token.to(dtype).expand(b, user_columns.numel(), -1)
        x = torch.cat([item_inputs.to(dtype) * real.unsqueeze(-1).to(dtype), user], dim=1)
        allowed, positions = prefix_user_layout(real, user_columns)
        if self.uses_bool_mask:
            mask = allowed.unsqueeze(1)
        else:
            mask = torch.zeros(allowed.shape, dtype=torch.float32, device=x.device)
            mask = mask.masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(1)
        out = self.decoder(inputs_embeds=x, attention_mask=mask, position_ids=positions, use_cache=False)
        return out.last_hidden_state[:, length:]


def item_adapter_for(
    item_dim: int,
    hidden_size: int,
    kind: str,
    catalog: torch.Tensor | None = None,
    input_scale: float = 1.0,
) -> nn.Module:
    """The map from MIRM item vectors to DUEG's input and scoring space (``dueg.item_adapter``).

    ``auto``: none when the widths agree (the paper: MIRM's states enter DUEG as they are), else a
    learned linear map. ``linear``: a learned affine map started as centring on the catalog mean
    (weights identity, or the default init when the widths differ). ``whiten``: a learned affine
    map started as the catalog's whitening, scaled to ``input_scale`` (the RMS of the decoder's
    own token embeddings, so items enter at the scale the decoder was trained on). ``mlp``: the
    same fixed whitening, then ``whiten``'s learned map plus a GELU MLP (``ResidualMlp``) that
    starts at zero, so the adapter starts as ``whiten`` and can learn what a linear map cannot.

    Why not the plain states: LLM final states share one dominant direction (the tiny preset's
    items have a mean pairwise cosine of 0.999), and after centring a few directions still carry
    most of the spread (the top 3 hold 70% on the embedded default) while what tells two items
    apart lies in the small ones. A cosine score cannot use the small directions until they are
    rescaled, and with cached item embeddings nothing else on the item side can learn to. On the
    embedded default DUEG stays at random ranking with ``linear`` and reaches about 3x popularity
    with ``whiten`` (README, benchmarks). ``catalog`` [n_items, item_dim] (no padding row) sets the
    statistics; without it (loading a checkpoint, whose weights replace the init) the map starts
    as the identity / default init.
    """
    if kind not in ("auto", "linear", "whiten", "mlp"):
        raise ValueError(f"dueg.item_adapter must be auto, linear, whiten or mlp, got {kind!r}")
    if kind == "auto":
        return nn.Identity() if item_dim == hidden_size else nn.Linear(item_dim, hidden_size)
    if kind in ("whiten", "mlp"):
        # fixed whitening, then a learned map started as the identity: a learned whitening matrix
        # would see the raw states (norm ~9 along the shared direction) and Adam's first steps
        # would undo it; the fixed statistics keep the learned map well conditioned
        layer = nn.Linear(item_dim, hidden_size)
        with torch.no_grad():
            layer.bias.zero_()
            if item_dim == hidden_size:
                layer.weight.copy_(torch.eye(hidden_size))
            else:
                nn.init.orthogonal_(layer.weight)  # keeps the whitened spread
        # the MLP as wide as its output, as content SASRec's projection: wider costs a catalog pass per step under ce
        learned = layer if kind == "whiten" else ResidualMlp(layer, hidden_size)
        return nn.Sequential(ItemWhitening(item_dim, catalog, input_scale), learned)
    layer = nn.Linear(item_dim, hidden_size)
    with torch.no_grad():
        if item_dim == hidden_size:
            layer.weight.copy_(torch.eye(hidden_size))
        mean = torch.zeros(item_dim) if catalog is None else catalog.detach().float().mean(0)
        layer.bias.copy_(-(layer.weight @ mean))
    return layer


class ResidualMlp(nn.Module):
    """``linear(x) + down(gelu(up(x)))``, ``down`` started at zero: the ``mlp`` item adapter's learned part.

    Why a non-linear part: over cached item vectors a linear adapter's item table is
    ``content @ W.T``, whose columns all lie in the ``item_dim``-dimensional span of the catalog's
    content columns; an ID table (SASRec's) places every item freely. On ML-1M (3,416 items,
    576-d SmolLM2 states) the linear map can set at most 576 items' vectors independently and the
    rest follow their content. The MLP lifts that limit while items stay content-only: no item ID
    enters (that is early fusion, ``dueg.item_id_embedding``).
    """

    def __init__(self, linear: nn.Linear, width: int) -> None:
        super().__init__()
        self.linear = linear
        self.up = nn.Linear(linear.in_features, width)
        self.down = nn.Linear(width, linear.out_features)
        with torch.no_grad():
            self.down.weight.zero_()
            self.down.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.down(nn.functional.gelu(self.up(x)))


def keep_first_layers(decoder: nn.Module, n_layers: int) -> nn.Module:
    """Keep the decoder's first ``n_layers`` blocks (``dueg.layers``; 0 keeps all), in place.

    A shallower DUEG over a deep backbone's lower layers (as HLLM's smaller user LLMs): the cost of
    a training step is linear in the depth. The config follows, so the result saves and loads as a
    regular transformers model of that depth.
    """
    total = len(decoder.layers)
    if n_layers < 0 or n_layers > total:
        raise UserError(f"dueg.layers must be between 0 (all) and the backbone's {total} layers, got {n_layers}")
    if n_layers in (0, total):
        return decoder
    decoder.layers = decoder.layers[:n_layers]
    decoder.config.num_hidden_layers = n_layers
    if getattr(decoder.config, "layer_types", None) is not None:
        decoder.config.layer_types = list(decoder.config.layer_types)[:n_layers]
    return decoder


def _token_embedding_rms(decoder: nn.Module) -> float:
    """Root mean square of the decoder's token-embedding entries: the scale its inputs have."""
    table = decoder.get_input_embeddings()
    if table is None or table.weight.shape[0] < 2:  # already dropped (a loaded DUEG): weights come from the checkpoint
        return float(getattr(decoder.config, "initializer_range", 0.02))
    return table.weight.detach().float().pow(2).mean().sqrt().item()


def _drop_word_embeddings(decoder: nn.Module) -> None:
    """Replace the decoder's token table by one unused row: DUEG only ever gets ``inputs_embeds``.

    Saves the vocabulary x hidden table (233M parameters on Qwen2-VL-2B) and keeps the decoder a
    regular transformers model that saves and loads as one (its config says vocab_size 1).
    """
    old = decoder.get_input_embeddings()
    if old is not None and old.weight.shape[0] == 1:
        return
    hidden = int(decoder.config.hidden_size)
    dtype = old.weight.dtype if old is not None else torch.float32
    placeholder = nn.Embedding(1, hidden, dtype=dtype)
    placeholder.weight.requires_grad_(False)  # never read: no optimizer state, no unused DDP parameter
    decoder.set_input_embeddings(placeholder)
    decoder.config.vocab_size = 1
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hasattr(decoder.config, name):
            setattr(decoder.config, name, None)


def decoder_of(backbone: nn.Module) -> nn.Module:
    """The decoder stack (no LM head, no vision tower) of a causal LM or a Qwen2-VL model.

    transformers' ``get_decoder()`` gives ``Qwen2VLTextModel`` for Qwen2-VL and the base model
    (e.g. ``LlamaModel``) for a causal LM; a peft wrapper must be merged before (MIRM saves merged
    weights).
    """
    get = getattr(backbone, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None or not hasattr(decoder, "config") or not hasattr(decoder, "layers"):
        raise UserError(f"{type(backbone).__name__}: cannot find its decoder stack (get_decoder() gave {type(decoder).__name__})")
    return decoder


def user_embedding_of(backbone: nn.Module, tokenizer) -> torch.Tensor | None:
    """The backbone's ``[User]`` token embedding (a row of its word table), or None if it has none."""
    if tokenizer is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(USER_TOKEN)
    unk = getattr(tokenizer, "unk_token_id", None)
    table = backbone.get_input_embeddings().weight
    if token_id is None or token_id == unk or not 0 <= token_id < table.shape[0]:
        return None
    return table[token_id].detach().float().clone()
