"""MIRM, the multimodal item model: item prompts -> the hidden state at ``[Cur_Item]``.

An item prompt is the template of the data source (``mirm.prompts``; placeholders ``{title}``,
``{description}``, ``{attributes}``, ``{image}``) with ``[Cur_Item]`` appended; the item embedding
is the decoder's final hidden state (after the last norm) at that token. The same encoder turns
SFT examples (molar/sft.py) into ChatML token ids with labels on the answer only.

Token assembly is done here rather than by a processor, so that:
- ``{image}`` becomes ``<|vision_start|>`` + n x ``<|image_pad|>`` + ``<|vision_end|>`` with
  n = patches / merge_size**2 of the resized image (what Qwen2VLProcessor inserts), or, on a
  backbone over frozen image features (``smollm2-135m+mobilenet``), ``mirm.image_tokens`` x
  ``<|image_pad|>`` that the projector's soft tokens replace; it is never truncated: the
  ``max_text_tokens`` budget applies to the text fields only, cutting the longest field first;
- a template line whose placeholders are all empty (no description, no image, a modality that is
  switched off) is dropped instead of leaving a dangling label;
- batches are padded on either side with positions that follow the real tokens only, so an item
  embeds to the same vector alone or in any batch (test_mirm.py checks this).

``mirm.modalities``: [text] drops ``{image}``; [image] drops the text fields, except that an item
without an image keeps its title (else every such item would embed to the same vector).

Entry points: ``make_encoder(backbone, mirm_params, data_source)`` -> ``PromptEncoder``;
``embed_items(backbone, encoder, item_texts(items_df), batch_size)`` -> [n, d] (no gradients);
``ItemEmbedder(model)(encoder.collate(encoder.encode_items(texts)))`` -> [B, d] (differentiable,
for training MIRM end to end; ``catalog_embedder`` does it by item_idx); ``image_features(model, batch)`` -> [n_images, d], the image side
alone (the vision tower, mean-pooled per image; content SASRec's image input); the train-mirm
recipe (``finetune``) is molar/recipes/mirm.py; the catalog table with row 0 = padding lives in
molar/embed_cache.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F

from molar.backbones import Backbone
from molar.config import PROMPT_FIELDS
from molar.errors import UserError
from molar.sft import IMAGE_MARKER, render_attributes

IGNORE_INDEX = -100  # label of positions that carry no loss (prompt, image and padding tokens)
TEXT_FIELDS = ("title", "description", "attributes")
_PLACEHOLDER = re.compile(r"\{(\w+)\}")


# ------------------------------------------------------------------------------ item texts
@dataclass(frozen=True)
class ItemText:
    title: str
    description: str
    attributes: str  # rendered "key: value; key: value"
    image_path: str | None


def item_texts(items: pl.DataFrame) -> list[ItemText]:
    """One ``ItemText`` per row of an items table (interim or processed), in row order."""
    return [
        ItemText(
            title=row["title"] or "",
            description=row["description"] or "",
            attributes=render_attributes(row["attributes"]),
            image_path=row["image_path"],
        )
        for row in items.select("title", "description", "attributes", "image_path").iter_rows(named=True)
    ]


def backbone_corpus(items: pl.DataFrame) -> list[str]:
    """The item texts the ``tiny-qwen2-vl`` tokenizer is trained on; pass it as ``load_backbone(..., corpus=)``
    wherever the base backbone is loaded, so every stage gets the same preset (ignored by real checkpoints)."""
    return [f"{t.title}\n{t.description}\n{t.attributes}" for t in item_texts(items)]


def input_report(items: pl.DataFrame, backbone: str, modalities: Sequence[str], source: str) -> dict:
    """What MIRM is fed: how many items carry each modality, and warnings where the input cannot help.

    Two cases run without error but learn little: the random-init ``tiny-qwen2-vl`` preset (right for
    the synthetic default, whose tokenizer and weights know nothing of real items) on real data, and a
    modality of ``mirm.modalities`` that no item has (images asked for on ml-100k, which has none).
    Returns ``{"items_with_image", "items_with_text", "missing_modalities", "warnings"}``.
    """
    from molar.backbones import SMOLLM2_135M, SMOLLM2_MOBILENET, TINY_QWEN2_VL

    texts = item_texts(items)
    present = {
        "image": sum(t.image_path is not None for t in texts),
        "text": sum(bool(t.title or t.description or t.attributes) for t in texts),
    }
    missing = [m for m in modalities if present[m] == 0]
    warnings = []
    if backbone == TINY_QWEN2_VL and source != "synthetic":
        warnings.append(
            f"mirm.backbone {TINY_QWEN2_VL} is a random-init model built for the synthetic default; on "
            f"data.source {source} its item embeddings carry little meaning. Use a pretrained one: "
            f"{SMOLLM2_135M} (text), {SMOLLM2_MOBILENET} (text and images) or a Qwen2-VL checkpoint directory "
            "(README: Real backbones)"
        )
    for modality in missing:
        warnings.append(
            f"mirm.modalities asks for {modality}, but none of the {items.height:,} items has "
            f"{'an image' if modality == 'image' else 'text'}; "
            f"drop it from mirm.modalities (it adds nothing to the prompts)"
        )
    return {
        "items_with_image": present["image"],
        "items_with_text": present["text"],
        "missing_modalities": missing,
        "warnings": warnings,
    }


def prompt_template(prompts: dict[str, str], source: str) -> str:
    """The template of ``source`` (``data.source``), else the default one."""
    return prompts.get(source, prompts["default"])


# ------------------------------------------------------------------------------ encoding
@dataclass
class Encoded:
    """One prompt as token ids; images in order of appearance with their pad-token counts."""

    input_ids: list[int]
    images: list[str] = field(default_factory=list)
    image_tokens: list[int] = field(default_factory=list)
    labels: list[int] | None = None  # SFT only: IGNORE_INDEX outside the answer

    def __len__(self) -> int:
        return len(self.input_ids)


def water_fill(lengths: Sequence[int], budget: int) -> list[int]:
    """Per-field token caps summing to at most ``budget``, cutting the longest fields first.

    Short fields (a title) stay whole while a long one (a description) is trimmed; ties are
    broken by position, so the result is deterministic.
    """
    if sum(lengths) <= budget:
        return list(lengths)
    caps = [0] * len(lengths)
    remaining, order = budget, sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    for rank, i in enumerate(order):
        share = remaining // (len(order) - rank)
        caps[i] = min(lengths[i], share)
        remaining -= caps[i]
    return caps


def _parse(template: str) -> list[list[tuple[str, str]]]:
    """Template -> lines -> segments ("text", literal) | ("field", name); newlines stay in the literals."""
    lines = []
    for line in template.splitlines(keepends=True):
        segments, pos = [], 0
        for m in _PLACEHOLDER.finditer(line):
            if m.group(1) not in PROMPT_FIELDS:
                raise ValueError(f"prompt template placeholder {{{m.group(1)}}} is not one of {PROMPT_FIELDS}")
            if m.start() > pos:
                segments.append(("text", line[pos : m.start()]))
            segments.append(("field", m.group(1)))
            pos = m.end()
        if pos < len(line):
            segments.append(("text", line[pos:]))
        lines.append(segments)
    return lines


class PromptEncoder:
    """Builds item prompts and SFT examples as token ids for one backbone, and batches them."""

    def __init__(
        self,
        backbone: Backbone,
        *,
        template: str,
        modalities: Sequence[str],
        max_text_tokens: int,
        sft_max_tokens: int = 384,
        image_root: str | Path = ".",
    ) -> None:
        if "image" in modalities and not backbone.supports_images:
            raise UserError(f"mirm.modalities {list(modalities)} asks for images; {backbone.name} is text-only")
        self.backbone = backbone
        self.tokenizer = backbone.tokenizer
        self.special = backbone.special
        self.lines = _parse(template)
        self.fields = {name for line in self.lines for kind, name in line if kind == "field"}
        self.use_text = "text" in modalities
        self.use_image = "image" in modalities
        self.max_text_tokens = max_text_tokens
        self.sft_max_tokens = sft_max_tokens
        self.image_root = Path(image_root)
        self._literal_ids: dict[str, list[int]] = {}
        self._image_token_cache: dict[str, int] = {}
        vocab = self.tokenizer.get_vocab()
        self.chatml = "<|im_start|>" in vocab and "<|im_end|>" in vocab

    # -------------------------------------------------------------------------- pieces
    def _ids(self, text: str) -> list[int]:
        if text not in self._literal_ids:
            self._literal_ids[text] = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self._literal_ids[text]

    def _image_file(self, path: str) -> Path:
        return self.image_root / path

    def _target_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image processor resizes to: aspect kept, sides in multiples of
        patch x merge, pixel count within the budget (Qwen2-VL's smart_resize)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = self.backbone.image_processor
        h, w = smart_resize(height, width, ip.patch_size * ip.merge_size, ip.size["shortest_edge"], ip.size["longest_edge"])
        return w, h

    def image_token_count(self, path: str) -> int:
        """Pad tokens the image at ``path`` becomes after resizing to the pixel budget (header read only);
        on a feature backbone, its fixed soft tokens per image."""
        if self.backbone.image_features is not None:
            return self.backbone.image_features.tokens
        if path not in self._image_token_cache:
            from PIL import Image

            with Image.open(self._image_file(path)) as img:
                w, h = self._target_size(*img.size)
            patches = (h // self.backbone.image_processor.patch_size) * (w // self.backbone.image_processor.patch_size)
            self._image_token_cache[path] = patches // self.backbone.merge_size**2
        return self._image_token_cache[path]

    def load_image(self, path: str):
        """The image at ``path`` as RGB, already at the processor's target size.

        JPEGs are decoded at a reduced scale when the budget is small (``draft``: several times
        faster than a full decode), then resized to the exact target, so the processor's own resize
        is a no-op and the token count is the one ``image_token_count`` promised.
        """
        from PIL import Image

        with Image.open(self._image_file(path)) as img:
            target = self._target_size(*img.size)
            img.draft("RGB", target)
            rgb = img.convert("RGB")
        return rgb if rgb.size == target else rgb.resize(target, Image.Resampling.BICUBIC)

    def _image_span(self, n_tokens: int) -> list[int]:
        s = self.special
        markers = s.vision_start is not None  # Qwen2-VL brackets the pads; a feature backbone has none
        return ([s.vision_start] if markers else []) + [s.image] * n_tokens + ([s.vision_end] if markers else [])

    # --------------------------------------------------------------------------- items
    def encode_items(self, items: Sequence[ItemText]) -> list[Encoded]:
        """Token ids of each item's prompt, ending in ``[Cur_Item]``."""
        # One batched tokenizer call per field the template uses (fast tokenizers run it in Rust).
        field_ids = {f: self._batch_ids([getattr(it, f) for it in items]) if f in self.fields else [[]] * len(items)
                     for f in TEXT_FIELDS}
        return [self._encode_item(i, it, field_ids) for i, it in enumerate(items)]

    def estimated_lengths(self, items: Sequence[ItemText]) -> list[int]:
        """Cheap prompt-length estimates for batching (no tokenising): text characters / 4 plus
        image tokens (from the image header). Only the grouping depends on it, never the result."""
        fields = [f for f in TEXT_FIELDS if f in self.fields]
        out = []
        for it in items:
            n = sum(len(getattr(it, f)) for f in fields) // 4
            if self.use_image and it.image_path is not None and "image" in self.fields:
                n += self.image_token_count(it.image_path)
            out.append(n)
        return out

    def _batch_ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: skips building a BatchEncoding
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _encode_item(self, i: int, item: ItemText, field_ids: dict[str, list[list[int]]]) -> Encoded:
        has_image = self.use_image and item.image_path is not None
        # [image] without an image: keep the title so the item is still identifiable.
        shown = set(TEXT_FIELDS) if self.use_text else ({"title"} if not has_image else set())
        kept: list[list[tuple[str, str]]] = []
        for line in self.lines:
            fields = [name for kind, name in line if kind == "field"]
            present = [f for f in fields if (f == "image" and has_image) or (f in shown and field_ids[f][i])]
            if fields and not present:
                continue
            kept.append([(k, n) for k, n in line if k == "text" or n in present])
        text_fields = [n for line in kept for k, n in line if k == "field" and n != "image"]
        caps = dict(zip(text_fields, water_fill([len(field_ids[f][i]) for f in text_fields], self.max_text_tokens)))
        ids: list[int] = []
        images, counts = [], []
        for line in kept:
            for kind, name in line:
                if kind == "text":
                    ids += self._ids(name)
                elif name == "image":
                    n = self.image_token_count(item.image_path)
                    ids += self._image_span(n)
                    images.append(item.image_path)
                    counts.append(n)
                else:
                    ids += field_ids[name][i][: caps[name]]
        ids.append(self.special.cur_item)
        return Encoded(ids, images, counts)

    # ----------------------------------------------------------------------------- SFT
    def encode_sft(self, prompt: str, image_paths: Sequence[str], target: str) -> Encoded:
        """ChatML user turn (text and images) + assistant answer; labels on the answer and its end token.

        Images are shown only when ``image`` is a modality (else their markers are dropped).
        Over ``sft_max_tokens``, the answer is cut to ``max_text_tokens`` and then the prompt's
        text pieces (never its images) are trimmed, longest first.
        """
        pieces = prompt.split(IMAGE_MARKER)
        if len(pieces) - 1 != len(image_paths):
            raise ValueError(f"SFT prompt has {len(pieces) - 1} {IMAGE_MARKER} markers but {len(image_paths)} image paths")
        if self.chatml:
            head, mid, tail = self._ids("<|im_start|>user\n"), self._ids("<|im_end|>\n<|im_start|>assistant\n"), self._ids("<|im_end|>")
        else:
            head, mid, tail = self._ids("User: "), self._ids("\nAssistant: "), [self.special.eos]
        text_ids = self._batch_ids(pieces)
        answer = self._ids_uncached(target)[: self.max_text_tokens] + tail
        counts = [self.image_token_count(p) for p in image_paths] if self.use_image else []
        spans = [self._image_span(n) for n in counts] if self.use_image else [[] for _ in image_paths]
        fixed = len(head) + len(mid) + len(answer) + sum(map(len, spans))
        caps = water_fill([len(t) for t in text_ids], max(0, self.sft_max_tokens - fixed))
        prompt_ids = list(head)
        for j, piece in enumerate(text_ids):
            prompt_ids += piece[: caps[j]]
            if j < len(spans):
                prompt_ids += spans[j]
        prompt_ids += mid
        shown = list(image_paths) if self.use_image else []
        return Encoded(
            prompt_ids + answer,
            shown,
            counts,
            labels=[IGNORE_INDEX] * len(prompt_ids) + answer,
        )

    def _ids_uncached(self, text: str) -> list[int]:
        return self._batch_ids([text])[0]

    # ---------------------------------------------------------------------------- batch
    def collate(self, encoded: Sequence[Encoded], pad_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest prompt; process the images; positions count real tokens only.

        Returns input_ids, attention_mask, cur_positions (index of each prompt's last real token,
        ``[Cur_Item]`` for items), labels (SFT), and, with images, pixel_values, image_grid_thw and
        mm_token_type_ids (1 on image pads; Qwen2-VL's M-RoPE needs it), or image_features
        ``[n_images, dim]`` on a feature backbone. Unless Qwen2-VL's M-RoPE places them, it also
        returns position_ids, so left padding does not shift positions.
        """
        if pad_side not in ("left", "right"):
            raise ValueError(f"pad_side must be left or right, got {pad_side!r}")
        width = max(len(e) for e in encoded)
        with_labels = encoded[0].labels is not None
        pad, ids, mask, lab, cur = self.special.pad, [], [], [], []
        for e in encoded:
            gap = width - len(e)
            right = pad_side == "right"
            ids.append(e.input_ids + [pad] * gap if right else [pad] * gap + e.input_ids)
            mask.append([1] * len(e) + [0] * gap if right else [0] * gap + [1] * len(e))
            if with_labels:
                lab.append(e.labels + [IGNORE_INDEX] * gap if right else [IGNORE_INDEX] * gap + e.labels)
            cur.append(len(e) - 1 if right else width - 1)
        # one tensor per field from nested lists: far cheaper than a tensor per row
        input_ids = torch.tensor(ids, dtype=torch.long)
        attention = torch.tensor(mask, dtype=torch.long)
        labels = torch.tensor(lab, dtype=torch.long) if with_labels else None
        cur = torch.tensor(cur, dtype=torch.long)
        out = {"input_ids": input_ids, "attention_mask": attention, "cur_positions": cur}
        if labels is not None:
            out["labels"] = labels
        paths = [p for e in encoded for p in e.images]
        if paths and self.backbone.image_features is not None:
            out["image_features"] = self.backbone.image_features([self._image_file(p) for p in paths])
        elif paths:
            out.update(self._pixels(paths, [n for e in encoded for n in e.image_tokens]))
            out["mm_token_type_ids"] = (input_ids == self.special.image).long()
        if "mm_token_type_ids" not in out:
            out["position_ids"] = (attention.cumsum(-1) - 1).clamp(min=0)
        return out

    def _pixels(self, paths: list[str], expected: list[int]) -> dict[str, torch.Tensor]:
        images = [self.load_image(p) for p in paths]
        processed = self.backbone.image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        got = (grid.prod(-1) // self.backbone.merge_size**2).tolist()
        if got != expected:
            raise RuntimeError(f"image token counts {got} differ from the prompt's {expected} (pixel budget changed?)")
        return {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}


# ------------------------------------------------------------------------------ forward
def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a PEFT wrapper (its LoRA layers stay active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states [B, L, d] of a collated batch (no LM head, no KV cache)."""
    inner = _hf_model(model).base_model  # Qwen2VLModel / LlamaModel / ...
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    if "pixel_values" in batch:
        inputs.update(
            pixel_values=batch["pixel_values"],
            image_grid_thw=batch["image_grid_thw"],
            mm_token_type_ids=batch["mm_token_type_ids"],
        )
    if "image_features" in batch:
        inputs["image_features"] = batch["image_features"]
    return inner(**inputs, use_cache=False).last_hidden_state


def image_side(model: torch.nn.Module) -> torch.nn.Module | None:
    """What turns images into LLM inputs: Qwen2-VL's vision tower, or the projector of a feature backbone."""
    base = _hf_model(model).base_model
    for name in ("visual", "projector"):
        module = getattr(base, name, None)
        if module is not None:
            return module
    return None


def cur_item_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Item embeddings [B, d]: the final hidden state at each prompt's ``[Cur_Item]``."""
    hidden = hidden_states(model, batch)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), batch["cur_positions"]]


def image_features(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One vector per image of a collated batch [n_images, d], in the batch's image order. MIRM's
    image side in one place: a backbone over a frozen image encoder (smollm2-135m+mobilenet) gives
    that encoder's features (the batch carries them); Qwen2-VL gives its vision tower's output for
    the image (its merged patch embeddings, already in the LLM's width), mean-pooled over patches."""
    if "image_features" in batch:
        return batch["image_features"].float()
    per_image = _hf_model(model).get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
    return torch.stack([patches.float().mean(0) for patches in per_image])


def image_state_width(model: torch.nn.Module) -> int:
    """Width of ``image_states``: a frozen image encoder's (smollm2-135m+mobilenet: 1,024), else the LLM's."""
    feature_dim = getattr(_hf_model(model).config, "image_feature_dim", None)
    return feature_dim or _hf_model(model).get_input_embeddings().embedding_dim


def image_states(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per prompt of a collated batch of item prompts, its image's ``image_features`` [B, d]; zeros
    for a prompt without an image (an item prompt shows at most one). The text is not run."""
    config = _hf_model(model).config
    out = torch.zeros(batch["input_ids"].shape[0], image_state_width(model), device=batch["input_ids"].device)
    if "pixel_values" not in batch and "image_features" not in batch:
        return out
    if "mm_token_type_ids" in batch:
        with_image = batch["mm_token_type_ids"].bool().any(1)
    else:  # soft image tokens stand at the image token's positions
        with_image = (batch["input_ids"] == config.image_token_id).any(1)
    features = image_features(model, batch)
    if features.shape[0] != int(with_image.sum()):
        raise ValueError(f"{features.shape[0]} images in a batch of {int(with_image.sum())} prompts with one; an item prompt shows one image")
    out[with_image] = features.to(out.dtype)
    return out


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over answer tokens only (labels != IGNORE_INDEX).

    The LM head runs on the answer positions only: with a 150k vocabulary, full-sequence logits
    would dominate memory for nothing.
    """
    hidden = hidden_states(model, batch)[:, :-1]
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    if not bool(mask.any()):
        raise ValueError("SFT batch without any answer token to learn from")
    logits = _hf_model(model).get_output_embeddings()(hidden[mask])
    return F.cross_entropy(logits.float(), targets[mask])


class ItemEmbedder(torch.nn.Module):
    """``forward(batch) -> [B, d]`` item embeddings; wrap it (DDP, ...) to train MIRM end to end."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cur_item_states(self.model, batch)


def catalog_embedder(encoder: PromptEncoder, items: pl.DataFrame) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]:
    """``embed(module, item_idx [N]) -> [N, d]``: the catalog's prompts (``items`` sorted by item_idx,
    prompt i-1 is item_idx i) encoded once, each call collating the asked items and running ``module``
    (an ``ItemEmbedder``, with gradients) on them: the item side of Molar end to end."""
    encoded = encoder.encode_items(item_texts(items))

    def embed(module: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        batch = encoder.collate([encoded[int(i) - 1] for i in ids.tolist()])
        return module({k: v.to(ids.device) for k, v in batch.items()})

    return embed


class SftModel(torch.nn.Module):
    """``forward(batch) -> loss``: the causal-LM fine-tuning objective as one module (for ``fit``/DDP).

    A batch without images leaves the vision tower (or projector) out of the graph, and
    DistributedDataParallel (``accelerate launch``) refuses parameters that receive no gradient.
    Such batches add 0 x (sum of the trainable image-side weights): the loss value is unchanged and
    every process reduces the same set of gradients (zeros for the tower).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        side = image_side(model)
        self._vision = [p for p in side.parameters() if p.requires_grad] if side is not None else []

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        loss = sft_loss(self.model, batch)
        if self._vision and "pixel_values" not in batch and "image_features" not in batch:
            loss = loss + 0.0 * sum(p.sum() for p in self._vision)
        return loss


# ----------------------------------------------------------------------------- embedding
def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (longest first: peak memory shows up at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


CHUNK_BATCHES = 16  # batches prepared together: sorted by true length inside, overlapped with the model


def item_chunks(encoder: PromptEncoder, items: Sequence[ItemText], batch_size: int) -> list[list[int]]:
    """The catalog cut into chunks of ``CHUNK_BATCHES`` batches' worth of items of similar estimated
    length (no tokenising needed); ``chunk_batches`` then sorts each chunk by its true token length."""
    return length_batches(encoder.estimated_lengths(items), batch_size * CHUNK_BATCHES)


def chunk_batches(
    encoder: PromptEncoder, items: Sequence[ItemText], chunk: Sequence[int], batch_size: int
) -> list[tuple[list[int], dict[str, torch.Tensor]]]:
    """Tokenise one chunk, sort it by token length, cut it into padded batches: [(item indices, batch)]."""
    encoded = encoder.encode_items([items[i] for i in chunk])
    order = sorted(range(len(chunk)), key=lambda j: (-len(encoded[j]), j))
    out = []
    for start in range(0, len(order), batch_size):
        picked = order[start : start + batch_size]
        out.append(([chunk[j] for j in picked], encoder.collate([encoded[j] for j in picked])))
    return out


@torch.inference_mode()
def embed_items(
    backbone: Backbone,
    encoder: PromptEncoder,
    items: Sequence[ItemText],
    batch_size: int,
    chunks: Sequence[Sequence[int]] | None = None,
    model: torch.nn.Module | None = None,
    states: Callable[[torch.nn.Module, dict[str, torch.Tensor]], torch.Tensor] = cur_item_states,
    width: int | None = None,
) -> torch.Tensor:
    """Item embeddings [len(items), width] (float32, CPU), in the order of ``items``.

    ``chunks``: index groups to run (default ``item_chunks``); rows outside every chunk stay zero
    (how a catalog is sharded across processes). On an accelerator a worker thread tokenises,
    sorts, pads and image-processes chunk k + 1 while the model runs on chunk k (tokenizers, PIL
    and torch release the GIL), so preparing the input costs little beyond the forward passes.
    ``model``: defaults to ``backbone.model`` (pass a wrapped or fine-tuned copy to embed with it).
    ``states``: (model, batch) -> [B, hidden_size], the vector of each prompt (default its
    ``[Cur_Item]`` state; ``image_states`` for the vision tower's features of its image).
    ``width``: what ``states`` returns per prompt (default ``hidden_size``; ``image_state_width`` for ``image_states``).
    """
    model = backbone.model if model is None else model
    model.eval()
    device = next(model.parameters()).device
    out = torch.zeros((len(items), backbone.hidden_size if width is None else width), dtype=torch.float32)
    chunks = item_chunks(encoder, items, batch_size) if chunks is None else [list(c) for c in chunks]
    if not chunks:
        return out

    def run(prepared: list[tuple[list[int], dict[str, torch.Tensor]]]) -> None:
        for idx, batch in prepared:
            batch = {key: v.to(device, non_blocking=True) for key, v in batch.items()}
            out[idx] = states(model, batch).float().cpu()

    if device.type == "cpu":
        # On CPU the model already keeps every core busy: a preparing thread would only preempt
        # torch's worker threads (and stall them at every parallel barrier), so prepare in turn.
        for chunk in chunks:
            run(chunk_batches(encoder, items, chunk, batch_size))
        return out
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(chunk_batches, encoder, items, chunks[0], batch_size)
        for k in range(len(chunks)):
            prepared = pending.result()
            if k + 1 < len(chunks):
                pending = pool.submit(chunk_batches, encoder, items, chunks[k + 1], batch_size)
            run(prepared)
    return out


def make_encoder(backbone: Backbone, mirm, source: str, image_root: str | Path = ".") -> PromptEncoder:
    """The encoder ``mirm`` params (``MirmParams``) describe, for data source ``source``."""
    return PromptEncoder(
        backbone,
        template=prompt_template(mirm.prompts, source),
        modalities=mirm.modalities,
        max_text_tokens=mirm.max_text_tokens,
        sft_max_tokens=mirm.sft_max_tokens,
        image_root=image_root,
    )
