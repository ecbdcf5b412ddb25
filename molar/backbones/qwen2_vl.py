"""Load a Qwen2-VL-family checkpoint directory (the tiny preset and real ones alike).

Tokenizer and image processor are loaded separately rather than as a ``Qwen2VLProcessor``: in
transformers 5 that class requires a video processor, which needs torchvision; MIRM only needs
text and still images, and inserts the image tokens itself (molar/models/mirm.py) exactly as the
processor would (``image_grid_thw.prod() // merge_size**2`` pads between the vision markers).
"""

from __future__ import annotations

from pathlib import Path

import torch

from molar.errors import UserError


def load_qwen2_vl(
    directory: Path,
    dtype: torch.dtype,
    image_min_pixels: int | None,
    image_max_pixels: int | None,
    trust_remote_code: bool = False,
):
    """(model, tokenizer, image_processor) from ``directory``, reading local files only."""
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(
        directory, local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(directory, local_files_only=True)
    set_pixel_budget(image_processor, image_min_pixels, image_max_pixels)
    return model, tokenizer, image_processor


def set_pixel_budget(image_processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Resize every image (aspect kept, sides in multiples of patch x merge) to [min_pixels, max_pixels]."""
    if min_pixels is None and max_pixels is None:
        return
    size = dict(image_processor.size)
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise UserError(
            f"mirm.image_min_pixels ({size['shortest_edge']}) is above mirm.image_max_pixels ({size['longest_edge']})"
        )
    image_processor.size = type(image_processor.size)(**size) if not isinstance(image_processor.size, dict) else size
