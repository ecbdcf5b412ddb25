"""probe.jsonl of benchmarks/bench_id_models_ml1m.py: fresh starts, resumes and redone epochs by hand."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_id_models_ml1m import ProbeLog


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_fresh_run_writes_one_line_per_validated_epoch(tmp_path):
    log = ProbeLog(tmp_path / "probe.jsonl", data_seconds=2.0)
    log.validated(10.0, 0.1)
    log.epoch_end(1)
    log.epoch_end(2)  # no validation this epoch: no line
    log.validated(30.0, 0.2)
    log.epoch_end(3)
    assert read(tmp_path / "probe.jsonl") == [
        {"validation": 1, "epoch": 1, "wall_seconds": 10.0, "test_ndcg@10": 0.1},
        {"validation": 2, "epoch": 3, "wall_seconds": 30.0, "test_ndcg@10": 0.2},
    ]


def test_a_resumed_run_continues_the_earlier_clock(tmp_path):
    path = tmp_path / "probe.jsonl"
    first = ProbeLog(path, data_seconds=2.0)
    for epoch, wall in [(1, 10.0), (2, 20.0)]:
        first.validated(wall, 0.1 * epoch)
        first.epoch_end(epoch)
    # the next session resumes at epoch 3, prepares its data in 3 s and validates 13 s after its start:
    # 20 s before, plus 13 s, less this session's 3 s of data preparation (counted once, in the 20)
    second = ProbeLog(path, data_seconds=3.0)
    second.validated(13.0, 0.3)
    second.epoch_end(3)
    assert [(line["validation"], line["epoch"], line["wall_seconds"]) for line in read(path)] == [(1, 1, 10.0), (2, 2, 20.0), (3, 3, 30.0)]


def test_a_fresh_start_over_another_runs_lines_drops_them(tmp_path):
    # the state in the folder was another run's (e.g. another thread count): fit starts at epoch 1
    path = tmp_path / "probe.jsonl"
    path.write_text("".join(json.dumps({"validation": v, "wall_seconds": 100.0 * v, "test_ndcg@10": 0.5}) + "\n" for v in (1, 2, 3)))
    log = ProbeLog(path, data_seconds=2.0)
    log.validated(9.0, 0.1)
    log.epoch_end(1)
    assert read(path) == [{"validation": 1, "epoch": 1, "wall_seconds": 9.0, "test_ndcg@10": 0.1}]


def test_an_epoch_redone_after_a_stop_replaces_its_line(tmp_path):
    # stopped after epoch 2's line was written but before its checkpoint: the resumed fit redoes epoch 2,
    # continuing the clock from epoch 1's line
    path = tmp_path / "probe.jsonl"
    first = ProbeLog(path, data_seconds=1.0)
    for epoch in (1, 2):
        first.validated(10.0 * epoch, 0.1)
        first.epoch_end(epoch)
    second = ProbeLog(path, data_seconds=1.0)
    second.validated(12.0, 0.25)
    second.epoch_end(2)
    lines = read(path)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[1]["test_ndcg@10"] == 0.25
    assert lines[1]["wall_seconds"] == pytest.approx(10.0 - 1.0 + 12.0)
