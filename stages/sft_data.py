"""Synthesise the MIRM fine-tuning mixture (IT / SA / UB, sft.mix) from the training split only."""

from __future__ import annotations

from pathlib import Path

import typer

from molar.data.split import load_split
from molar.io import METRICS, PROCESSED, write_json, write_parquet
from molar.sft import synthesize
from stages.common import PARAMS_OPTION, prepare_outputs, read_params, user_errors

SFT_DATA = Path("data/sft/sft.parquet")
REPORT = METRICS / "sft.json"


def main(params: Path = PARAMS_OPTION) -> None:
    cfg = read_params(params)
    prepare_outputs(SFT_DATA, REPORT)
    with user_errors():
        split = load_split(PROCESSED)
        table, report = synthesize(
            split.items,
            split.train,
            tasks=cfg.sft.mix,
            samples_per_task=cfg.sft.samples_per_task,
            seed=cfg.seed,
            ub_history=cfg.sft.ub_history,
            use_images="image" in cfg.mirm.modalities,
        )
    write_parquet(table, SFT_DATA)
    write_json(report, REPORT)
    counts = ", ".join(f"{task} {n:,}" for task, n in report["tasks"].items())
    typer.echo(f"sft-data: {counts} (IT text fallback: {report.get('it_text_fallback', 0):,}) -> {SFT_DATA}")
