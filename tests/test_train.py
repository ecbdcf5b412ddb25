import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from molar.train import CHECKPOINT, LoopSettings, cpu_has_bf16, epoch_rng, fit, lr_factor, resolve_mixed_precision

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

# A tiny run that draws from every RNG the loop checkpoints (torch: dropout and noise, numpy,
# python), uses gradient accumulation with a short last window, validates every epoch and
# checkpoints every 2 optimizer steps. KILL_AT_LOSS=n: SIGKILL itself at the n-th loss call;
# KILL_AT_SAVE=n: at the n-th checkpoint rename, after the temporary file is written;
# KILL_AT_EPOCH_END=n: after validating epoch n, before its checkpoint.
CHILD = textwrap.dedent(
    """
    import json, os, random, signal, sys
    from pathlib import Path
    import numpy as np
    import torch
    from safetensors.torch import save_file
    import molar.train as train

    out, state = Path(sys.argv[1]), Path(sys.argv[2])
    kill_loss = int(os.environ.get("KILL_AT_LOSS", 0))
    kill_save = int(os.environ.get("KILL_AT_SAVE", 0))
    kill_epoch = int(os.environ.get("KILL_AT_EPOCH_END", 0))
    calls = {"loss": 0, "save": 0}

    real_replace = train.os.replace
    def replace(src, dst):
        calls["save"] += 1
        if calls["save"] == kill_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_replace(src, dst)
    train.os.replace = replace

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(70, 6, generator=g), torch.randn(6, 1, generator=g)
    y = x @ w + 0.1 * torch.randn(70, 1, generator=g)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def make_batches(epoch):
        order = train.epoch_rng(3, epoch).permutation(60)
        for s in range(0, 60, 8):
            idx = torch.from_numpy(order[s:s + 8])
            yield x[idx], y[idx]

    def compute_loss(m, batch):
        calls["loss"] += 1
        if calls["loss"] == kill_loss:
            os.kill(os.getpid(), signal.SIGKILL)
        xb, yb = batch
        noise = 0.05 * torch.randn_like(xb)
        scale = 1.0 + 0.1 * float(np.random.rand()) + 0.1 * random.random()
        loss = scale * torch.nn.functional.mse_loss(m(xb + noise), yb)
        return loss, {"loss": loss.item()}

    def validate(m):
        return {"neg_mse": -torch.nn.functional.mse_loss(m(x[60:]), y[60:]).item()}

    def on_epoch_end(epoch, record):
        if epoch == kill_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    settings = train.LoopSettings(lr=0.05, epochs=4, seed=5, warmup_ratio=0.25, grad_accum=3, grad_clip=1.0,
                                  checkpoint_every=2, patience=None)
    result = train.fit(model, settings, make_batches, 8, compute_loss, state, "key-1",
                       validate=validate, select_metric="neg_mse", on_epoch_end=on_epoch_end, desc="tiny")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
    ckpt = torch.load(state / train.CHECKPOINT, weights_only=True)
    last = {k: v.contiguous() for k, v in ckpt["model"].items()}
    save_file(last, str(out / "last.safetensors"))
    history = [{k: v for k, v in r.items() if k != "seconds"} for r in result.history]
    (out / "result.json").write_text(json.dumps({"history": history, "best_epoch": result.best_epoch,
                                                 "best_metric": result.best_metric, "steps": result.steps}))
    """
)


def _run_child(script: Path, out: Path, state: Path, **kill: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **{k: str(v) for k, v in kill.items()}}
    return subprocess.run([sys.executable, str(script), str(out), str(state)], env=env, capture_output=True, text=True, timeout=300)


def _outputs(out: Path) -> tuple[bytes, bytes, str]:
    return (out / "weights.safetensors").read_bytes(), (out / "last.safetensors").read_bytes(), (out / "result.json").read_text()


def test_killed_runs_resume_to_bit_identical_results(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    ref = _run_child(script, tmp_path / "ref", tmp_path / "ref_state")
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = _outputs(tmp_path / "ref")
    assert json.loads(reference[2])["steps"] == 4 * 3  # 8 batches per epoch in windows of 3, 3, 2

    # kill -9 at several points of one run, resuming each time: mid-window in epoch 2 (the
    # last checkpoint is epoch 1's end; loss calls 9 and 10 are redone), inside a checkpoint
    # write (the temporary file is complete, the rename has not happened), between the
    # validation of epoch 3 and its checkpoint
    state, out = tmp_path / "state", tmp_path / "out"
    for kill in ({"KILL_AT_LOSS": 11}, {"KILL_AT_SAVE": 2}, {"KILL_AT_EPOCH_END": 3}):
        proc = _run_child(script, out, state, **kill)
        assert proc.returncode == -signal.SIGKILL, (kill, proc.stdout[-2000:], proc.stderr[-3000:])
        assert (state / CHECKPOINT).exists()
        assert bool(list(state.glob(".*.tmp"))) == ("KILL_AT_SAVE" in kill)  # stale temporaries are cleaned up
        assert "resuming" in proc.stdout or kill == {"KILL_AT_LOSS": 11}
    final = _run_child(script, out, state)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "resuming" in final.stdout
    assert _outputs(out) == reference  # best weights, last weights and per-epoch history: bit for bit


# ----------------------------------------------------------------------- in-process tests
def _tiny_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    return x, y


def _linear(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 1)


def _batches(x, y, size):
    def make(epoch):
        order = epoch_rng(0, epoch).permutation(len(x))
        for s in range(0, len(x), size):
            idx = torch.from_numpy(order[s : s + size])
            yield x[idx], y[idx]

    return make


def _mse(m, batch):
    xb, yb = batch
    loss = torch.nn.functional.mse_loss(m(xb), yb)
    return loss, {"loss": loss.item()}


def test_lr_schedule_warms_up_from_the_start_factor_then_decays_to_zero():
    assert lr_factor(0, 100, 10, 0.01) == pytest.approx(0.01)
    assert lr_factor(5, 100, 10, 0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, 100, 10, 0.01) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.01) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, 0.01) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0, 100, 0, 0.01) == pytest.approx(1.0)  # no warm-up: start at the peak


def test_changed_run_key_starts_fresh(tmp_path):
    x, y = _tiny_problem()
    settings = LoopSettings(lr=0.1, epochs=2, seed=0)
    first = fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    assert not first.resumed
    same = fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    assert same.resumed and same.history == first.history

    calls = []

    def counting_loss(m, batch):
        calls.append(1)
        return _mse(m, batch)

    other = fit(_linear(), settings, _batches(x, y, 8), 4, counting_loss, tmp_path, "run-b")
    assert not other.resumed and len(calls) == 8  # trained from scratch, not resumed
    assert [r["loss"] for r in other.history] == [r["loss"] for r in first.history]  # same data, same seed
    changed = fit(_linear(), LoopSettings(lr=0.2, epochs=2, seed=0), _batches(x, y, 8), 4, _mse, tmp_path, "run-b")
    assert not changed.resumed  # same key, other settings: a different run
    cadence = fit(_linear(), LoopSettings(lr=0.2, epochs=2, seed=0, checkpoint_every=7), _batches(x, y, 8), 4, _mse, tmp_path, "run-b")
    assert cadence.resumed  # how often to checkpoint does not change the run


def test_a_saved_state_that_no_longer_fits_the_model_starts_fresh(tmp_path):
    # same run key (same params), but the model code changed since: a wider layer
    x, y = _tiny_problem()
    settings = LoopSettings(lr=0.1, epochs=2, seed=0)
    fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    torch.manual_seed(0)
    wider = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    again = fit(wider, settings, _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    assert not again.resumed and len(again.history) == 2
    assert fit(wider, settings, _batches(x, y, 8), 4, _mse, tmp_path, "run-a").resumed  # its own state now


def test_cpu_bf16_is_read_from_the_cpu_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert cpu_has_bf16(cpuinfo) is False  # AVX-512 alone: bf16 still emulated
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n")
    assert cpu_has_bf16(cpuinfo) is True
    assert cpu_has_bf16(tmp_path / "absent") is None  # not Linux: unknown, no warning


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_bf16_arithmetic_warns(tmp_path, monkeypatch, capsys, native):
    import molar.train

    monkeypatch.setattr(molar.train, "cpu_has_bf16", lambda: native)
    x, y = _tiny_problem()
    fit(_linear(), LoopSettings(lr=0.1, epochs=1, seed=0, mixed_precision="bf16"), _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    warned = "bf16 autocast on a CPU without bf16 arithmetic" in capsys.readouterr().out
    assert warned is (not native)


@pytest.mark.parametrize(
    "cuda, cuda_bf16, cpu_bf16, expected",
    [(False, None, True, "bf16"), (False, None, False, "no"), (False, None, None, "no"), (True, True, False, "bf16"), (True, False, True, "no")],
)
def test_auto_mixed_precision_is_bf16_only_where_the_device_computes_it(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    import molar.train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda_bf16)
    monkeypatch.setattr(molar.train, "cpu_has_bf16", lambda: cpu_bf16)
    assert resolve_mixed_precision("auto") == expected
    for explicit in ("no", "bf16", "fp16"):  # only auto is resolved
        assert resolve_mixed_precision(explicit) == explicit


@pytest.mark.parametrize("native", [False, True])
def test_auto_trains_in_the_resolved_precision_and_keys_its_state_by_it(tmp_path, monkeypatch, native):
    import molar.train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(molar.train, "cpu_has_bf16", lambda: native)
    x, y = _tiny_problem()
    fp32 = fit(_linear(), LoopSettings(lr=0.1, epochs=2, seed=0), _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    assert fp32.mixed_precision == "no"
    auto = fit(_linear(), LoopSettings(lr=0.1, epochs=2, seed=0, mixed_precision="auto"), _batches(x, y, 8), 4, _mse, tmp_path, "run-a")
    assert auto.mixed_precision == ("bf16" if native else "no")
    # auto that resolves to fp32 is the fp32 run (its finished state replayed); resolved to bf16 it is another run
    assert auto.resumed is (not native)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    x, y = _tiny_problem()
    settings = LoopSettings(lr=0.1, epochs=2, seed=0, mixed_precision="bf16")
    result = fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "k")
    assert all(math.isfinite(r["loss"]) for r in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_early_stopping_keeps_the_best_epoch_weights(tmp_path):
    x, y = _tiny_problem()
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    seen = {}

    def validate(m):
        seen[len(seen) + 1] = {k: v.clone() for k, v in m.state_dict().items()}
        return {"ndcg@10": next(scores)}

    settings = LoopSettings(lr=0.1, epochs=5, seed=0, patience=2)
    result = fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "k", validate, "ndcg@10")
    assert result.stopped_early and len(result.history) == 4
    assert result.best_epoch == 2 and result.best_metric == 0.7
    for k, v in result.best_state.items():
        assert torch.equal(v, seen[2][k])
    assert [r["valid_ndcg@10"] for r in result.history] == [0.5, 0.7, 0.6, 0.65]


def test_changing_patience_continues_the_run_a_fresh_run_would_have_been(tmp_path):
    x, y = _tiny_problem()
    scores = [0.5, 0.7, 0.6, 0.65, 0.9, 0.8]  # by epoch; patience 2 stops at 4, patience 3 runs to 6

    def validate_by_epoch(calls: list):
        def validate(m):
            calls.append(1)
            return {"ndcg@10": scores[len(calls) - 1]}
        return validate

    def run(patience, state_dir, calls):
        settings = LoopSettings(lr=0.1, epochs=6, seed=0, patience=patience)
        return fit(_linear(), settings, _batches(x, y, 8), 4, _mse, state_dir, "k", validate_by_epoch(calls), "ndcg@10")

    reference = run(3, tmp_path / "fresh", [])
    assert not reference.stopped_early and reference.best_epoch == 5

    stopped = run(2, tmp_path / "continued", calls := [])
    assert stopped.stopped_early and len(stopped.history) == 4
    continued = run(3, tmp_path / "continued", calls)  # the stopped run revived, not restarted
    assert continued.resumed and len(calls) == 6  # epochs 5 and 6 only were trained and validated
    assert continued.history == [dict(r, seconds=c["seconds"]) for r, c in zip(reference.history, continued.history)]
    assert continued.best_epoch == 5 and not continued.stopped_early
    for k, v in reference.best_state.items():
        assert torch.equal(v, continued.best_state[k])

    restarted = run(1, tmp_path / "continued", calls := [])  # patience 1 would have stopped at epoch 3
    assert not restarted.resumed and len(restarted.history) == 3 and restarted.stopped_early


def test_validate_every_skips_epochs_but_always_validates_the_last(tmp_path):
    x, y = _tiny_problem()
    settings = LoopSettings(lr=0.1, epochs=5, seed=0, validate_every=2)
    result = fit(_linear(), settings, _batches(x, y, 8), 4, _mse, tmp_path, "k", lambda m: {"m": 1.0}, "m")
    assert [("valid_m" in r) for r in result.history] == [False, True, False, True, True]


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    x, y = _tiny_problem()
    settings = LoopSettings(lr=0.01, epochs=1, seed=0)
    whole = _linear()
    fit(whole, settings, lambda e: iter([(x, y)]), 1, _mse, tmp_path / "a", "k")
    halves = _linear()
    accum = LoopSettings(lr=0.01, epochs=1, seed=0, grad_accum=2)
    fit(halves, accum, lambda e: iter([(x[:16], y[:16]), (x[16:], y[16:])]), 2, _mse, tmp_path / "b", "k")
    for a, b in zip(whole.parameters(), halves.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_param_groups_train_each_group_at_its_own_lr(tmp_path):
    # One AdamW step from zero moments moves every weight by lr x sign(gradient) (m / sqrt(v) = +-1 after the
    # bias correction; the schedule's factor is 1 at step 0 without warm-up): the weight at 0.1, the bias at 0.001.
    x, y = _tiny_problem()
    model = _linear()
    before = [p.detach().clone() for p in (model.weight, model.bias)]
    groups = [{"params": [model.weight]}, {"params": [model.bias], "lr": 0.001}]
    fit(model, LoopSettings(lr=0.1, epochs=1, seed=0), lambda e: iter([(x, y)]), 1, _mse, tmp_path, "k", param_groups=groups)
    moved = [(p.detach() - b).abs() for p, b in zip((model.weight, model.bias), before)]
    torch.testing.assert_close(moved[0], torch.full_like(moved[0], 0.1), rtol=1e-4, atol=0)
    torch.testing.assert_close(moved[1], torch.full_like(moved[1], 0.001), rtol=1e-4, atol=0)


def test_wrong_batch_count_is_an_error(tmp_path):
    x, y = _tiny_problem()
    with pytest.raises(RuntimeError, match="batches_per_epoch=5"):
        fit(_linear(), LoopSettings(lr=0.1, epochs=1, seed=0), _batches(x, y, 8), 5, _mse, tmp_path, "k")


def test_non_finite_loss_stops_with_a_clear_error(tmp_path):
    x, y = _tiny_problem()

    def nan_loss(m, batch):
        return m(batch[0]).sum() * math.nan, {}

    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        fit(_linear(), LoopSettings(lr=0.1, epochs=1, seed=0), _batches(x, y, 8), 4, nan_loss, tmp_path, "k")


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError):
        LoopSettings(lr=0.1, epochs=0, seed=0)
    with pytest.raises(ValueError):
        LoopSettings(lr=0.1, epochs=1, seed=0, warmup_ratio=1.0)


def test_shard_gives_each_process_an_equal_share_by_hand():
    from molar.train import shard

    batches = ["a", "b", "c", "d", "e"]
    assert shard(batches, 0, 1) == batches
    assert shard(batches, 0, 2) == ["a", "c", "e"]
    assert shard(batches, 1, 2) == ["b", "d", "a"]  # topped up from the start: both take 3 steps
    assert shard(batches, 2, 3) == ["c", "a"]
    with pytest.raises(ValueError, match="rank 2"):
        shard(batches, 2, 2)
