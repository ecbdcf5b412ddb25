"""A rerun of a finished training run replays it, and the log says so and how to retrain."""

from __future__ import annotations

import torch

from molar.train import LoopSettings, fit


def _fit(state_dir, calls: list):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, generator=g)
    y = x.sum(dim=1, keepdim=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)

    def loss(m, batch):
        calls.append(1)
        xb, yb = batch
        value = torch.nn.functional.mse_loss(m(xb), yb)
        return value, {"loss": value.item()}

    return fit(model, LoopSettings(lr=0.1, epochs=2, seed=0), lambda epoch: [(x[:4], y[:4]), (x[4:], y[4:])], 2, loss, state_dir, "key")


def test_replaying_a_finished_run_says_so_and_how_to_retrain(tmp_path, capsys):
    state_dir = tmp_path / "data" / "state" / "train-tiny"
    calls: list = []
    first = _fit(state_dir, calls)
    assert len(calls) == 4 and not first.resumed
    assert "replayed" not in capsys.readouterr().out  # a fresh run is not a replay

    again = _fit(state_dir, calls)
    assert again.resumed and len(calls) == 4  # nothing trained
    out = capsys.readouterr().out
    assert f"{state_dir} holds a finished run with this key; replayed it, no training" in out
    assert f"To retrain from scratch: rm -r {state_dir} && dvc repro" in out
