"""The ``smollm2-135m+mobilenet`` preset: SmolLM2-135M-Instruct reading frozen MobileNet v1 image features.

Architecture (``ImageFeatureLMForCausalLM``, LLaVA-1.5's recipe over one global image embedding):
an image becomes a ``dim``-wide feature vector from a frozen extractor (image_features.py: the
TFLite MobileNet v1, 1,024-d); a trainable projector ``Linear(dim, h) - GELU - Linear(h, h x T)``
(LLaVA-1.5's two-layer MLP, its second layer widened to T = ``mirm.image_tokens`` tokens, since a
global embedding has no patch grid to give one token per patch) turns it into T soft tokens of the
LLM's width h, written over the T ``<|image_pad|>`` tokens that stand where the prompt's ``{image}``
is; the text goes through the LLM as usual and ``[Cur_Item]`` comes last (molar/models/mirm.py).

The checkpoint directory is a regular transformers one (config.json with ``model_type``
``molar_image_feature_lm`` and the LLM's own config as ``text_config``, model.safetensors with the
LLM and the projector, tokenizer files) plus, once trained, ``image_encoder.json`` naming the
features its projector learned (their sha256). ``get_decoder()`` is the plain LLM (LlamaModel, with
its own LlamaConfig), so DUEG saves and loads it like any text decoder.

``build_image_feature_lm(text_dir, out, image_tokens)`` makes the preset from a text causal LM
directory (the converted SmolLM2, smollm2.py; any Llama-family LM in tests): the LLM's weights, a
projector drawn from a fixed seed (weights ~ N(0, 1/dim) then N(0, rms(token embeddings)^2 / h),
so the soft tokens start near the scale of the word embeddings), and ``<|image_pad|>`` added to the
tokenizer. Deterministic: the same inputs give the same files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import ClassVar

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.modeling_outputs import CausalLMOutputWithPast

from molar.io import atomic_path

MODEL_TYPE = "molar_image_feature_lm"
IMAGE_TOKEN = "<|image_pad|>"
FEATURE_DIM = 1024  # MobileNet v1's embedding width (image_features.py)
BUILD = {"format_version": 1, "projector_seed": 0}


@strict
class ImageFeatureLMConfig(PreTrainedConfig):
    """A text LM's config (``text_config``) plus the image side: ``image_tokens`` soft tokens per image
    from ``image_feature_dim``-wide features, placed at ``image_token_id``."""

    model_type = MODEL_TYPE
    sub_configs_defaults: ClassVar[dict[str, SubConfigSpec]] = {"text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama")}

    text_config: dict | PreTrainedConfig | None = None
    image_tokens: int = 4
    image_feature_dim: int = FEATURE_DIM
    image_token_id: int | None = None
    projector_hidden_act: str = "gelu"
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config.tie_word_embeddings:  # SmolLM2 ties its LM head to the word embeddings
            self.tie_word_embeddings = True


# known to AutoConfig, so AutoTokenizer / AutoConfig read these directories without remote code
AutoConfig.register(MODEL_TYPE, ImageFeatureLMConfig, exist_ok=True)


class ImageProjector(nn.Module):
    """``[N, dim]`` image features -> ``[N, tokens, hidden]`` soft tokens (Linear - GELU - Linear)."""

    def __init__(self, config: ImageFeatureLMConfig) -> None:
        super().__init__()
        hidden = config.text_config.hidden_size
        self.tokens = config.image_tokens
        self.linear_1 = nn.Linear(config.image_feature_dim, hidden)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(hidden, hidden * config.image_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear_2(self.act(self.linear_1(features)))
        return out.view(features.shape[0], self.tokens, -1)


class ImageFeatureLMPreTrainedModel(PreTrainedModel):
    config_class = ImageFeatureLMConfig
    config: ImageFeatureLMConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True


class ImageFeatureLMModel(ImageFeatureLMPreTrainedModel):
    """Projector + LLM decoder: ``forward(input_ids, image_features=[N, dim], ...)`` -> last_hidden_state."""

    def __init__(self, config: ImageFeatureLMConfig) -> None:
        super().__init__(config)
        self.projector = ImageProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None) -> torch.Tensor:
        """Word embeddings with each image's soft tokens over its ``<|image_pad|>`` run, in order."""
        embeds = self.get_input_embeddings()(input_ids)
        slots = input_ids == self.config.image_token_id
        n_slots = int(slots.sum())
        n_features = 0 if image_features is None else image_features.shape[0] * self.config.image_tokens
        if n_slots != n_features:
            raise ValueError(
                f"{n_slots} {IMAGE_TOKEN} tokens but {n_features} image soft tokens "
                f"({0 if image_features is None else image_features.shape[0]} images x {self.config.image_tokens})"
            )
        if image_features is None:
            return embeds
        soft = self.projector(image_features.to(device=embeds.device, dtype=self.projector.linear_1.weight.dtype))
        return embeds.masked_scatter(slots.unsqueeze(-1), soft.reshape(-1, embeds.shape[-1]).to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, image_features)
        elif image_features is not None:
            raise ValueError("image_features need input_ids (their <|image_pad|> positions)")
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )


class ImageFeatureLMForCausalLM(ImageFeatureLMPreTrainedModel):
    """``ImageFeatureLMModel`` + the LLM's head (tied to the word embeddings when the LLM ties them)."""

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: ImageFeatureLMConfig) -> None:
        super().__init__(config)
        self.model = ImageFeatureLMModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, image_features=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            image_features=image_features, **kwargs).last_hidden_state
        return CausalLMOutputWithPast(logits=self.lm_head(hidden))


# --------------------------------------------------------------------------------- the preset
def build_key(text_dir: Path, image_tokens: int, feature_dim: int = FEATURE_DIM) -> str:
    """What the preset directory is a function of (the text LM directory is named by its source)."""
    recipe = {**BUILD, "text": Path(text_dir).name, "image_tokens": image_tokens, "feature_dim": feature_dim}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def build_image_feature_lm(text_dir: Path, directory: Path, image_tokens: int, feature_dim: int = FEATURE_DIM) -> Path:
    """Write the checkpoint directory: the text LM of ``text_dir`` + a seeded projector + ``<|image_pad|>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from molar.backbones import add_tokens

    text = AutoModelForCausalLM.from_pretrained(text_dir, local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(text_dir, local_files_only=True)
    (image_token_id,) = add_tokens(text, tokenizer, [IMAGE_TOKEN])
    config = ImageFeatureLMConfig(text_config=text.config, image_tokens=image_tokens, image_feature_dim=feature_dim,
                                  image_token_id=image_token_id)
    model = ImageFeatureLMForCausalLM(config)
    prefix = text.base_model_prefix + "."
    weights = {("model.language_model." + k[len(prefix):] if k.startswith(prefix) else k): v
               for k, v in text.state_dict().items()}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(not k.startswith("model.projector.") for k in missing):
        raise ValueError(f"{text_dir}: weights do not fit the image-feature LM (missing {missing}, unexpected {unexpected})")
    _init_projector(model.model.projector, model.get_input_embeddings().weight, BUILD["projector_seed"])
    with atomic_path(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory


@torch.no_grad()
def _init_projector(projector: ImageProjector, word_embeddings: torch.Tensor, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    rms = float(word_embeddings.float().pow(2).mean().sqrt())
    for layer, std in ((projector.linear_1, projector.linear_1.in_features ** -0.5),
                       (projector.linear_2, rms * projector.linear_2.in_features ** -0.5)):
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator) * std)
        layer.bias.zero_()


def load_image_feature_lm(directory: Path, dtype: torch.dtype):
    """(model, tokenizer) from a checkpoint directory, reading local files only."""
    from transformers import AutoTokenizer

    model = ImageFeatureLMForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
