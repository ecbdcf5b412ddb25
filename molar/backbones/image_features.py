"""Frozen image feature extractors for the ``smollm2-135m+mobilenet`` preset, and their per-image cache.

``open_image_encoder(spec)`` reads ``mirm.image_encoder``:
- a path to a TensorFlow Lite embedding extractor (``TfliteEncoder``): the pretrained MobileNet v1 of
  ``../shared/models/coral-mobilenet/`` (224x224 RGB uint8 in, a 1,024-d uint8 embedding out,
  dequantized with the output tensor's scale and zero point), run by the ``ai-edge-litert`` package;
- ``pooled-pixels`` (``PooledPixels``): a parameter-free stand-in of the same width for machines
  without the TFLite file (tests use it): each cell of a 16x16 grid gives its mean R, G, B and the
  standard deviation of its luma.

Images are resized to the encoder's input size without keeping the aspect (a 2:3 poster is squeezed,
not cropped: its title and top stay in view). ``ImageFeatures`` (the backbone's image input, as the
image processor is Qwen2-VL's) returns ``[N, dim]`` float32 features for image files and caches
them by content: the key of an image is the sha256 of its bytes, under a folder named by the
encoder's identity (the sha256 of its file), so a renamed or re-ingested image reuses its features
and another encoder never does. Cache files (one safetensors per image, written atomically) live
under ``<cache>/image-features/``; deleting them is safe (they are recomputed identically).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from molar.backbones import BackboneError
from molar.io import atomic_path

POOLED_PIXELS = "pooled-pixels"
ENCODER_FILE = "image_encoder.json"  # beside a checkpoint's weights: which features its projector was trained on
TENSOR = "features"


class ImageEncoderError(BackboneError):
    """``mirm.image_encoder`` names nothing usable; the message says what to do."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


class TfliteEncoder:
    """A TensorFlow Lite image embedding model: ``encode(rgb image) -> [dim]`` float32 (dequantized)."""

    kind = "tflite"

    def __init__(self, path: Path, threads: int = 1) -> None:
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError as err:
            raise ImageEncoderError(
                f"mirm.image_encoder: {path} is a TensorFlow Lite model, which needs the ai-edge-litert package "
                f"(pip install ai-edge-litert; {err})"
            ) from None
        self.path = Path(path)
        self.sha256 = _sha256_file(self.path)
        self.interpreter = Interpreter(model_path=str(self.path), num_threads=max(1, threads))
        self.interpreter.allocate_tensors()
        (inp,), (out,) = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        shape = [int(s) for s in inp["shape"]]
        if len(shape) != 4 or shape[0] != 1 or shape[3] != 3 or inp["dtype"] != np.uint8:
            raise ImageEncoderError(
                f"mirm.image_encoder: {path} takes {shape} {np.dtype(inp['dtype']).name} input; an image embedding "
                "extractor taking one [1, height, width, 3] uint8 RGB image is needed (e.g. "
                "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite)"
            )
        self._input, self._output = inp["index"], out["index"]
        self.size = (shape[2], shape[1])  # PIL order: (width, height)
        self.dim = int(np.prod(out["shape"][1:]))
        scale, zero_point = out["quantization"]
        self._dequantize = (float(scale), int(zero_point)) if scale else None

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "file": self.path.name, "sha256": self.sha256, "dim": self.dim}

    def encode(self, image) -> np.ndarray:
        from PIL import Image

        pixels = np.asarray(image.convert("RGB").resize(self.size, Image.Resampling.BILINEAR), dtype=np.uint8)
        self.interpreter.set_tensor(self._input, pixels[None])
        self.interpreter.invoke()
        raw = self.interpreter.get_tensor(self._output).reshape(-1)
        if self._dequantize is None:
            return raw.astype(np.float32)
        scale, zero_point = self._dequantize
        return ((raw.astype(np.float32) - zero_point) * scale).astype(np.float32)


class PooledPixels:
    """Parameter-free stand-in (1,024-d): per cell of a 16x16 grid over the image resized to 64x64,
    the mean of R, G and B and the standard deviation of the luma, all in [0, 1]."""

    kind = POOLED_PIXELS
    grid, cell = 16, 4
    dim = 16 * 16 * 4
    size = (64, 64)
    sha256 = hashlib.sha256(b"molar pooled-pixels v1: 16x16 cells of 4x4, mean RGB + luma std").hexdigest()

    @property
    def identity(self) -> dict:
        return {"kind": self.kind, "file": None, "sha256": self.sha256, "dim": self.dim}

    def encode(self, image) -> np.ndarray:
        from PIL import Image

        rgb = np.asarray(image.convert("RGB").resize(self.size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
        cells = rgb.reshape(self.grid, self.cell, self.grid, self.cell, 3).transpose(0, 2, 1, 3, 4)
        cells = cells.reshape(self.grid * self.grid, self.cell * self.cell, 3)
        luma = cells @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.concatenate([cells.mean(1).reshape(-1), luma.std(1)]).astype(np.float32)


def open_image_encoder(spec: str, threads: int = 1):
    """The encoder ``mirm.image_encoder`` names: ``pooled-pixels`` or the path of a ``.tflite`` file."""
    if spec == POOLED_PIXELS:
        return PooledPixels()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ImageEncoderError(
            f"mirm.image_encoder: {spec} does not exist (resolved from {Path.cwd()}). The smollm2-135m+mobilenet "
            "backbone reads its image features from the MobileNet v1 embedding extractor "
            "mobilenet_v1_1.0_224_quant_embedding_extractor.tflite (on our machines in ../shared/models/coral-mobilenet/; "
            "source: github.com/google-coral/test_data). Point mirm.image_encoder at that file, or set "
            f"mirm.image_encoder: {POOLED_PIXELS} (a parameter-free stand-in), or mirm.modalities: [text]."
        )
    if path.suffix != ".tflite":
        raise ImageEncoderError(f"mirm.image_encoder: {spec} is not a .tflite file; give a TensorFlow Lite image "
                                f"embedding extractor or {POOLED_PIXELS}")
    return TfliteEncoder(path, threads)


class ImageFeatures:
    """The image input of a feature-based backbone: image files -> ``[N, dim]`` float32 features.

    ``tokens``: soft tokens the projector makes of one image (what a prompt's ``{image}`` becomes).
    ``cache_dir``: where features are kept by image content (None: memory only).
    """

    def __init__(self, encoder, tokens: int, cache_dir: str | Path | None = None) -> None:
        self.encoder = encoder
        self.tokens = tokens
        self.dim = encoder.dim
        self.cache_dir = Path(cache_dir) / f"{encoder.kind}-{encoder.sha256[:16]}" if cache_dir is not None else None
        self._memory: dict[str, np.ndarray] = {}

    @property
    def identity(self) -> dict:
        """What the features are (kind, file name, sha256, width): recorded beside a trained checkpoint."""
        return self.encoder.identity

    def _disk_path(self, key: str) -> Path | None:
        return self.cache_dir / key[:2] / f"{key}.safetensors" if self.cache_dir is not None else None

    def features_of_bytes(self, data: bytes) -> np.ndarray:
        key = hashlib.sha256(data).hexdigest()
        hit = self._memory.get(key)
        if hit is not None:
            return hit
        path = self._disk_path(key)
        if path is not None and path.exists():
            from safetensors.numpy import load_file

            hit = load_file(str(path))[TENSOR]
        else:
            from PIL import Image

            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", self.encoder.size)  # JPEG: decode at a reduced scale when it is enough
                hit = self.encoder.encode(img)
            if path is not None:
                from safetensors.numpy import save_file

                with atomic_path(path) as tmp:
                    save_file({TENSOR: hit}, str(tmp))
        self._memory[key] = hit
        return hit

    def __call__(self, files: Sequence[str | Path]) -> torch.Tensor:
        rows = [self.features_of_bytes(Path(f).read_bytes()) for f in files]
        return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, self.dim)

    def save_pretrained(self, directory: str | Path) -> None:
        (Path(directory) / ENCODER_FILE).write_text(json.dumps(self.identity, indent=2, sort_keys=True) + "\n")

    def check_checkpoint(self, directory: str | Path) -> None:
        """Refuse a checkpoint whose projector was trained on other features than this encoder's."""
        path = Path(directory) / ENCODER_FILE
        if not path.exists():
            return  # an untrained preset: any encoder of the right width fits
        saved = json.loads(path.read_text())
        if saved.get("sha256") != self.encoder.sha256:
            raise ImageEncoderError(
                f"{directory} was trained on the image features of {saved.get('kind')} {saved.get('file') or ''} "
                f"(sha256 {str(saved.get('sha256'))[:12]}...), but mirm.image_encoder gives {self.encoder.kind} "
                f"{self.identity['file'] or ''} (sha256 {self.encoder.sha256[:12]}...); point mirm.image_encoder at "
                "the encoder it was trained with, or retrain (dvc repro)"
            )
