"""Load a text-only causal LM directory (SmolLM2, a saved fine-tune of it, any *ForCausalLM)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_text_lm(directory: Path, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, tokenizer) from ``directory``, reading local files only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        directory, local_files_only=True, dtype=dtype, trust_remote_code=trust_remote_code
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=trust_remote_code)
    return model, tokenizer
