"""Build the `tiny-qwen2-vl` preset: a self-contained, random-init Qwen2-VL checkpoint directory.

The directory holds exactly what a real Qwen2-VL checkpoint directory holds (config.json,
model.safetensors, tokenizer files, preprocessor/processor config, chat template), so the rest of
the code loads it with the same ``from_pretrained(dir, local_files_only=True)`` calls as
Qwen2-VL-2B-Instruct; only the directory differs (DESIGN.md section 4).

Everything is a pure function of ``RECIPE`` and the corpus: the BPE training is deterministic for
a given input order and the weights come from a fixed seed, so rebuilding gives identical files and
the pipeline stays reproducible. ``build_key`` names that function's input; the loader caches one
directory per key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from molar.io import atomic_path

# The preset's shape. Text: head_dim = 64 / 4 = 16, so the M-RoPE sections (temporal, height,
# width) must sum to head_dim / 2 = 8. Vision: one block over 14x14 patches, merged 2x2 into one
# text-sized token, so a 56x56 image becomes 4 image tokens.
RECIPE = {
    "seed": 0,
    "vocab_size": 2048,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "mrope_section": [2, 3, 3],
    "max_position_embeddings": 4096,
    "vision_depth": 1,
    "vision_embed_dim": 32,
    "vision_num_heads": 2,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
    "min_pixels": 28 * 28,
    "max_pixels": 56 * 56,
    "format_version": 1,
}

# Qwen2-VL's own special tokens (same strings as the real tokenizer, so prompts are portable),
# then the two Molar adds. Their ids are the first ids of the vocabulary, in this order.
QWEN2_VL_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
MOLAR_SPECIAL_TOKENS = ["[Cur_Item]", "[User]"]

# A ChatML template that places images the way Qwen2-VL-Instruct's does, so
# ``processor.apply_chat_template`` works on the preset like on the real model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A fixed English corpus so the vocabulary covers prompt wording and common words even when the
# item corpus is small; the item texts are appended after it.
BUILTIN_CORPUS = """\
Title: Description: Attributes: Genres: Category: Brand: Colour: Color: Material: Price: Year:
Describe this item in detail. Write a natural-language description of the item from its title and attributes.
The user recently interacted with the following items. Predict the title of the next item the user will choose.
This item is a product. It is made of cotton, wool, leather, metal, plastic, wood, glass, steel, silk, linen.
Its colour is red, orange, yellow, green, blue, purple, pink, brown, black, white, grey, silver, gold.
It belongs to the category of shoes, shirts, bags, watches, lamps, chairs, books, toys, phones, cameras.
The price is 5, 10, 12.5, 19.99, 25, 49.99, 99, 120, 250 dollars. It was released in 1995, 2001, 2010, 2023.
A movie about love, war, crime, comedy, drama, horror, thriller, adventure, animation, documentary, fantasy.
Children's Film-Noir Musical Mystery Romance Sci-Fi Western Action Comedy Drama Horror Thriller War
The quick brown fox jumps over the lazy dog. A good and useful thing that people like to buy and use every day.
with and or of to in for on by from at as is are was were be been has have had this that these those it its
one two three four five six seven eight nine ten new old small large light dark soft hard long short classic modern
"""


def build_key(corpus: Sequence[str]) -> str:
    """Hash of everything the built directory depends on (recipe, built-in corpus, item corpus)."""
    h = hashlib.sha256()
    h.update(json.dumps(RECIPE, sort_keys=True).encode())
    h.update(BUILTIN_CORPUS.encode())
    for text in corpus:
        h.update(b"\x00")
        h.update(text.encode())
    return h.hexdigest()


def _train_tokenizer(corpus: Iterable[str]):
    """A byte-level BPE (as Qwen2's) with the special tokens first; any UTF-8 text is encodable."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import TokenizersBackend

    special = QWEN2_VL_SPECIAL_TOKENS + MOLAR_SPECIAL_TOKENS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=RECIPE["vocab_size"],
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([BUILTIN_CORPUS, *corpus], trainer=trainer)
    return TokenizersBackend(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=special[1:],
        padding_side="right",
        model_max_length=RECIPE["max_position_embeddings"],
    )


def _config(tokenizer):
    from transformers import Qwen2VLConfig

    r = RECIPE
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIAL_TOKENS}
    return Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": r["hidden_size"],
            "intermediate_size": r["intermediate_size"],
            "num_hidden_layers": r["num_hidden_layers"],
            "num_attention_heads": r["num_attention_heads"],
            "num_key_value_heads": r["num_key_value_heads"],
            "max_position_embeddings": r["max_position_embeddings"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": r["mrope_section"]},
            "bos_token_id": None,
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": r["vision_depth"],
            "embed_dim": r["vision_embed_dim"],
            "hidden_size": r["hidden_size"],
            "num_heads": r["vision_num_heads"],
            "mlp_ratio": 2,
            "patch_size": r["patch_size"],
            "spatial_merge_size": r["spatial_merge_size"],
            "temporal_patch_size": r["temporal_patch_size"],
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def build_tiny_qwen2_vl(out_dir: str | Path, corpus: Sequence[str] = ()) -> Path:
    """Write the preset checkpoint directory to ``out_dir`` (atomically) and return it."""
    from transformers import Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    out_dir = Path(out_dir)
    tokenizer = _train_tokenizer(corpus)
    config = _config(tokenizer)
    # The PIL backend needs no torchvision; its saved config loads into whichever backend is installed.
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=RECIPE["min_pixels"],
        max_pixels=RECIPE["max_pixels"],
        patch_size=RECIPE["patch_size"],
        merge_size=RECIPE["spatial_merge_size"],
        temporal_patch_size=RECIPE["temporal_patch_size"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE

    # Only the CPU generator is used (the model is built on CPU); leave the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RECIPE["seed"])
        model = Qwen2VLForConditionalGeneration(config).eval()

    with atomic_path(out_dir) as tmp:
        model.save_pretrained(tmp)
        # Tokenizer files + preprocessor_config.json: the layout of a real Qwen2-VL directory. (No
        # Qwen2VLProcessor: in transformers 5 it insists on a video processor, which needs torchvision.)
        tokenizer.save_pretrained(tmp)
        image_processor.save_pretrained(tmp)
        (tmp / "molar_preset.json").write_text(
            json.dumps({"preset": "tiny-qwen2-vl", "recipe": RECIPE, "key": build_key(corpus)}, indent=2) + "\n"
        )
    return out_dir
