"""Fine-tune MIRM on the SFT mixture (mirm.finetune: full | lora | staged | none), save it, embed the catalog.

Outputs: data/models/mirm/ (a checkpoint directory `from_pretrained` loads: LoRA is merged into
the weights; with finetune: none, the base checkpoint plus the [Cur_Item]/[User] tokens),
data/models/mirm-items.safetensors (the catalog embedding cache, molar/embed_cache.py),
metrics/mirm.json. Resumable training state lives in data/state/train-mirm/ (persist: true).
Runs under `accelerate launch` as is: training is data-parallel, catalog embedding sharded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import polars as pl
import typer

from molar.io import METRICS, MODELS, PROCESSED, STATE, atomic_path, write_json
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, require_input, use_threads, user_errors
from stages.sft_data import SFT_DATA

MIRM_DIR = MODELS / "mirm"
ITEM_EMBEDDINGS = MODELS / "mirm-items.safetensors"
STATE_DIR = STATE / "train-mirm"
RECORD = METRICS / "mirm.json"


def main(params: Path = PARAMS_OPTION) -> None:
    # torch/transformers load here, not at import: `molar --help` stays fast
    from molar.backbones import DTYPES, load_backbone, mirm_load_options
    from molar.embed_cache import cached_catalog_embeddings, checkpoint_key
    from molar.models.mirm import backbone_corpus, input_report, make_encoder
    from molar.recipes.mirm import finetune
    from molar.train import CHECKPOINT, process_state, run_defining, run_key

    cfg = read_params(params)
    prepare_outputs(MIRM_DIR, ITEM_EMBEDDINGS, STATE_DIR / CHECKPOINT, RECORD)
    threads = use_threads(cfg)
    mirm = cfg.mirm
    state = process_state()
    started = time.perf_counter()
    with user_errors():
        items = pl.read_parquet(require_input(PROCESSED / "items.parquet", "split")).sort("item_idx")
        inputs = input_report(items, mirm.backbone, mirm.modalities, cfg.data.source)
        if state.is_main_process:
            for warning in inputs["warnings"]:
                typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
        training = mirm.finetune != "none"
        load = dict(corpus=backbone_corpus(items), modalities=mirm.modalities, **mirm_load_options(mirm))
        with state.main_process_first():  # the first process builds/converts a preset; the others reuse it
            # Training keeps float32 master weights (bf16/fp16 become mixed precision in the loop).
            backbone = load_backbone(mirm.backbone, dtype="float32" if training else mirm.dtype, **load)
        encoder = make_encoder(backbone, mirm, cfg.data.source)
        base_key = checkpoint_key(backbone.directory)
        # Written beside the weights: what this checkpoint is (deterministic, no timings).
        card = {"base": mirm.backbone, "base_checkpoint_sha256": base_key, "finetune": mirm.finetune,
                "modalities": mirm.modalities, "lora": "merged into the weights" if mirm.finetune in ("lora", "staged") else None}
        record: dict = dict(card)
        if training:
            examples = pl.read_parquet(require_input(SFT_DATA, "sft-data"))
            key = run_key("mirm", run_defining(mirm.model_dump(mode="json")), cfg.seed, base_key, examples.hash_rows().to_list())
            result = finetune(backbone, encoder, examples, mirm, cfg.seed, STATE_DIR, key)
            card["run_key"] = key
            record.update(run_key=key, examples=examples.height, steps=result.steps, resumed=result.resumed,
                          final_loss=result.history[-1].get("loss"), history=result.history)
        if state.is_main_process:
            backbone.model.to("cpu", DTYPES[mirm.dtype])
            with atomic_path(MIRM_DIR) as tmp:
                backbone.save(tmp)
                (tmp / "molar_mirm.json").write_text(json.dumps(card, indent=2) + "\n")
        state.wait_for_everyone()

        # Embed the catalog from the saved directory, so the cache key is the one readers compute.
        saved = load_backbone(MIRM_DIR, dtype=mirm.dtype, device=state.device, **(load | {"corpus": ()}))
        table = cached_catalog_embeddings(
            ITEM_EMBEDDINGS, saved, make_encoder(saved, mirm, cfg.data.source), items, mirm.embed_batch_size, mirm.dtype
        )
    if state.is_main_process:
        norms = table[1:].norm(dim=1)
        record.update(
            n_items=table.shape[0] - 1,
            hidden_size=table.shape[1],
            item_embedding_norm_mean=float(norms.mean()),
            item_embedding_std=float(table[1:].std(dim=0).mean()),  # ~0 would mean collapsed embeddings
            inputs=inputs,  # items per modality and the warnings printed above
            threads=threads,  # results are bit-identical for one thread count only
            seconds=round(time.perf_counter() - started, 1),
        )
        write_json(record, RECORD)
        typer.echo(
            f"train-mirm ({mirm.backbone}, {mirm.finetune}): {table.shape[0] - 1:,} item embeddings of size "
            f"{table.shape[1]} -> {MIRM_DIR}/, {ITEM_EMBEDDINGS}"
        )
