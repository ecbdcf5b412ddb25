"""The shared training loop: ``fit(model, settings, make_batches, ...)`` with exact resume.

Model-agnostic: the caller owns the model, the batches and the loss; this module owns the
optimisation (AdamW, linear warm-up then cosine decay, gradient accumulation and clipping,
mixed precision and device placement through ``accelerate``), epoch-level validation with
early stopping and best-weights selection, the progress bar, and checkpoint/resume.

Contract
--------
``fit(model, settings, make_batches, batches_per_epoch, compute_loss, state_dir, run_key,
validate=None, select_metric=None, on_epoch_end=None, desc="train") -> FitResult``

- ``make_batches(epoch) -> Iterable[batch]``: the micro-batches of epoch ``epoch`` (0-based), in
  order, exactly ``batches_per_epoch`` of them. It must be a pure function of ``epoch`` (and of
  the caller's seed), e.g. shuffled with ``epoch_rng(seed, epoch)``, and must not draw from the
  global RNGs: on resume the loop rebuilds the epoch and skips the batches already consumed.
  Keep batches on the CPU; the loop moves tensors (also inside tuples/lists/dicts) to the device.
- ``compute_loss(model, batch) -> (loss, logs)``: a scalar loss tensor (mean over the batch) and
  floats to average per epoch (e.g. ``{"loss": loss.item()}``). Randomness in it (dropout,
  negative sampling) must come from the global torch/numpy/python RNGs, which are checkpointed.
- ``validate(model) -> dict[str, float]``: called every ``validate_every`` epochs and after the
  last epoch, in eval mode under ``torch.no_grad()``; ``select_metric`` (higher is better) picks
  the best epoch and drives early stopping (``patience`` validations without improvement).
  Without ``validate`` the final weights are the result.
- ``on_epoch_end(epoch, record)``: called with each finished epoch's history record (1-based
  ``epoch``), e.g. to rewrite plot files. On resume it is not called again for finished epochs.
- Returns ``FitResult`` (history, best epoch/metric/weights). The model is left holding the
  selected weights (best validated epoch, else the last).
- One optimizer step per ``grad_accum`` micro-batches; the last window of an epoch may be
  shorter (its loss is averaged over the micro-batches it has). ``checkpoint_every`` counts
  optimizer steps.

Resume
------
``state_dir/checkpoint.pt`` holds model, optimizer, scheduler and grad-scaler state, the RNG
states of python/numpy/torch (and CUDA), the epoch and the number of micro-batches done in it,
the epoch's running loss sums, the history (early stopping is judged from it), the best weights
and metric, plus ``run_key``. It is written atomically (temporary file + rename) every
``checkpoint_every`` optimizer steps and at the end of every epoch, so a process killed at any
point (kill -9 included) restarts from the last checkpoint and, on CPU, ends with bit-identical
weights and metrics. A checkpoint whose key differs is deleted and training starts fresh: the
key is the caller's ``run_key`` (a hash of the params and data that define the run) joined with
a hash of ``settings`` (all but ``CONTINUABLE``). A finished run keeps its checkpoint marked done:
rerunning returns the stored result without training, and says so (``replay_message``: even
``dvc repro -f`` replays it; deleting ``state_dir`` retrains from scratch).

``checkpoint_every`` and ``patience`` (``CONTINUABLE``) say when to save and when to stop, not how
to train, so changing them continues a run: on resume the stored validation history is replayed
under the new ``patience``. Raising it revives a run that stopped early, and the continued run is
the one a fresh run with that patience would have been; a patience that would have stopped before
the checkpoint's epoch cannot be honoured from it, so that run starts fresh. Callers hash their
params with ``run_defining`` to leave the same fields out of ``run_key``. Checkpoints are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from tqdm.auto import tqdm

from molar.io import atomic_path, sweep_temps

CHECKPOINT = "checkpoint.pt"
FORMAT_VERSION = 1
# loop settings that say when to save and when to stop, not how to train: changing them continues a run
CONTINUABLE = frozenset({"checkpoint_every", "patience"})


@dataclass(frozen=True)
class LoopSettings:
    lr: float
    epochs: int
    seed: int
    weight_decay: float = 0.0
    warmup_ratio: float = 0.0  # fraction of all optimizer steps spent warming up linearly
    warmup_start_factor: float = 0.01  # warm-up starts at 1/100 of the peak learning rate
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = 0.0  # max global gradient norm; 0 = no clipping
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: resolve_mixed_precision
    patience: int | None = None  # validations without improvement before stopping; None = never
    validate_every: int = 1  # epochs between validations (the last epoch is always validated)
    checkpoint_every: int = 200  # optimizer steps between mid-epoch checkpoints

    @classmethod
    def from_section(cls, section: Any, seed: int, **extra: Any) -> "LoopSettings":
        """The loop settings a params section (``mirm``, ``sasrec``, ``train``) defines: every field of
        this class the section has under the same name, plus ``seed`` and ``extra`` (fields the
        section names differently)."""
        names = {f.name for f in fields(cls)} - {"seed"} - extra.keys()
        return cls(seed=seed, **{n: getattr(section, n) for n in names if hasattr(section, n)}, **extra)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.grad_accum < 1 or self.validate_every < 1 or self.checkpoint_every < 1:
            raise ValueError(f"epochs, grad_accum, validate_every and checkpoint_every must be >= 1: {self}")
        if not 0.0 <= self.warmup_ratio < 1.0 or not 0.0 < self.warmup_start_factor <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1) and warmup_start_factor in (0, 1]: {self}")
        if self.patience is not None and self.patience < 1:
            raise ValueError(f"patience must be >= 1 or None: {self}")


@dataclass
class FitResult:
    history: list[dict[str, float]]  # one record per epoch: epoch (1-based), lr, seconds, logs, valid metrics
    best_epoch: int  # 1-based epoch whose weights were selected
    best_metric: float | None  # select_metric at best_epoch (None without validation)
    best_state: dict[str, torch.Tensor]  # CPU copy of the selected weights
    steps: int  # optimizer steps taken
    stopped_early: bool
    resumed: bool = False  # this call continued (or returned) a checkpointed run
    mixed_precision: str = "no"  # the precision it trained in (``auto`` resolved)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers
def epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The data-order RNG of one epoch: independent of the global RNGs, so resume can rebuild it."""
    return np.random.default_rng([seed, epoch])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_factor(step: int, total_steps: int, warmup_steps: int, start_factor: float) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return start_factor + (1.0 - start_factor) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": int(np_state["state"]["pos"]),
        "numpy_has_gauss": int(np_state["has_gauss"]),
        "numpy_gauss": float(np_state["gauss"]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": state["numpy_has_gauss"],
            "gauss": state["numpy_gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(b, device) for b in batch]
        return type(batch)(moved) if not hasattr(batch, "_fields") else type(batch)(*moved)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _save_atomic(obj: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary sibling, fsync, rename: a kill leaves the old or the new file."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(state_dir: Path, run_key: str) -> dict[str, Any] | None:
    """The checkpoint of run ``run_key`` in ``state_dir``, or None (state of another run is deleted)."""
    path = Path(state_dir) / CHECKPOINT
    if not path.exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("run_key") != run_key or ckpt.get("format") != FORMAT_VERSION:
        tqdm.write(f"{path}: state of another run (run key {ckpt.get('run_key')!r} != {run_key!r}); starting fresh")
        path.unlink()
        return None
    return ckpt


def _state_fits(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> bool:
    """Whether ``saved`` (a checkpoint's model weights) has exactly ``model``'s weight names and shapes."""
    own = model.state_dict()
    return own.keys() == saved.keys() and all(own[k].shape == saved[k].shape for k in own)


def process_state():
    """accelerate's process group view (one process unless run under ``accelerate launch``/``torchrun``).

    ``ACCELERATE_USE_CPU=1`` (set by ``accelerate launch --cpu``) makes a multi-process CPU run
    use gloo, as ``Accelerator`` does; a bare ``PartialState()`` would ignore it.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def shard(batches: list, rank: int, world: int) -> list:
    """Process ``rank``'s share of an epoch's batches when ``world`` processes train together: every
    ``world``-th batch, topped up from the start so that all processes take the same number of
    steps (DDP needs that; a few batches are seen twice per epoch instead)."""
    if world <= 1:
        return batches
    if not 0 <= rank < world:
        raise ValueError(f"process rank {rank} is outside the world of {world}")
    mine = batches[rank::world]
    return [*mine, *batches[: shard_len(len(batches), world) - len(mine)]]


def shard_len(n_batches: int, world: int) -> int:
    """How many of an epoch's ``n_batches`` each of ``world`` processes takes (``shard``)."""
    return -(-n_batches // world)


def run_key(*parts: object) -> str:
    """A short hash of everything that defines a training run, for ``fit``'s ``run_key``.

    Parts are params (hashed as sorted JSON), tensors and numpy arrays (hashed by value).
    """
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().float().numpy().tobytes())
        elif isinstance(part, np.ndarray):
            h.update(part.tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def run_defining(section: dict[str, Any]) -> dict[str, Any]:
    """A params section (as a dict) without the ``CONTINUABLE`` fields, for hashing into ``run_key``."""
    return {k: v for k, v in section.items() if k not in CONTINUABLE}


def stop_epoch_of(history: list[dict[str, float]], select_metric: str | None, patience: int | None) -> int | None:
    """The epoch at which early stopping ends a run with this ``history``: the first at which
    ``patience`` validations in a row have not improved ``select_metric``; None if none has.
    A pure function of the history, so a resumed run can be judged under another patience."""
    best, bad = None, 0
    for record in history:
        value = record.get(f"valid_{select_metric}")
        if value is None:  # an epoch without validation
            continue
        if best is None or value > best:
            best, bad = value, 0
        else:
            bad += 1
        if patience is not None and bad >= patience:
            return int(record["epoch"])
    return None


def sequences_fingerprint(sequences) -> str:
    """A short hash of integer sequences (a split's histories), order and boundaries included."""
    h = hashlib.sha256()
    for s in sequences:
        h.update(np.asarray(s, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _settings_key(settings: LoopSettings) -> str:
    fields = {k: v for k, v in asdict(settings).items() if k not in CONTINUABLE}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def cpu_has_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool | None:
    """Whether the CPU computes in bf16 natively (AVX512-BF16 or AMX-BF16 among ``cpuinfo``'s flags);
    None where that file cannot be read (not Linux). Without it, bf16 autocast works but is emulated."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", text) is not None


def resolve_mixed_precision(choice: str) -> str:
    """``auto`` -> ``bf16`` where the device computes in bf16 natively (a CUDA GPU that supports it, a CPU
    with AVX512-BF16 or AMX), else ``no``: emulated bf16 is many times slower than float32. Other
    choices are returned as given."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():  # accelerate places the model on the GPU then
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if cpu_has_bf16() else "no"


def _make_accelerator(mixed_precision: str) -> Accelerator:
    try:
        return Accelerator(mixed_precision=mixed_precision)
    except ValueError as err:
        # accelerate keeps one process-wide state; a single-process caller (tests, notebooks) may
        # legitimately fit twice with different precision, so reset it rather than refuse.
        if "already been initialized" not in str(err) or AcceleratorState().num_processes != 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision)


# --------------------------------------------------------------------------------- fit
def replay_message(desc: str, state_dir: Path) -> str:
    """What a rerun of a finished run (``dvc repro -f`` included) says: nothing was trained, and how
    to train again (DVC reruns a stage whose state output is gone)."""
    return (
        f"{desc}: {state_dir} holds a finished run with this key; replayed it, no training. "
        f"To retrain from scratch: rm -r {state_dir} && dvc repro"
    )


def fit(
    model: torch.nn.Module,
    settings: LoopSettings,
    make_batches: Callable[[int], Iterable[Any]],
    batches_per_epoch: int,
    compute_loss: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]],
    state_dir: Path,
    run_key: str,
    validate: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    select_metric: str | None = None,
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "train",
    param_groups: list[dict[str, Any]] | None = None,
) -> FitResult:
    """Train ``model`` (see the module docstring for the contract); resumable from ``state_dir``.

    ``param_groups``: AdamW parameter groups (``{"params": [...], "lr": peak lr}``; a group without ``lr``
    trains at ``settings.lr``) covering each parameter once; default: all at ``settings.lr``. The schedule
    scales every group's peak alike; the caller's ``run_key`` must cover the groups' lrs."""
    if batches_per_epoch < 1:
        raise ValueError(f"{desc}: batches_per_epoch must be >= 1 (got {batches_per_epoch}); is the training data empty?")
    if (validate is None) != (select_metric is None):
        raise ValueError(f"{desc}: pass validate and select_metric together")
    state_dir = Path(state_dir)
    ckpt_path = state_dir / CHECKPOINT
    # auto resolved first: a state saved in one precision is not resumed in another (another machine)
    settings = replace(settings, mixed_precision=resolve_mixed_precision(settings.mixed_precision))
    # the loop settings define the run as much as the caller's params: changing them starts fresh
    run_key = f"{run_key}/{_settings_key(settings)}"

    accelerator = _make_accelerator(settings.mixed_precision)
    if settings.mixed_precision == "bf16" and accelerator.device.type == "cpu" and cpu_has_bf16() is False:
        tqdm.write(f"{desc}: warning: bf16 autocast on a CPU without bf16 arithmetic (no avx512_bf16 or amx_bf16 in "
                   f"/proc/cpuinfo) is emulated, many times slower than float32; set mixed_precision: no for this machine")
    optimizer = torch.optim.AdamW(param_groups or model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    steps_per_epoch = math.ceil(batches_per_epoch / settings.grad_accum)
    total_steps = steps_per_epoch * settings.epochs
    warmup_steps = round(settings.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup_steps, settings.warmup_start_factor)
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    # ---------------------------------------------------------------- fresh start or resume
    sweep_temps(ckpt_path)  # left by a process killed while saving
    ckpt = load_checkpoint(state_dir, run_key)
    if ckpt is not None and not _state_fits(raw_model, ckpt["model"]):
        # same params, other model code (a layer added or resized since): its weights cannot be loaded
        tqdm.write(f"{ckpt_path}: the saved state does not fit this model (weight names or shapes differ: "
                   f"the code changed since it was saved); starting fresh")
        ckpt_path.unlink()
        ckpt = None
    if ckpt is not None:  # the stored run under this call's patience (it may differ from the stored one's)
        stop_epoch = stop_epoch_of(ckpt["history"], select_metric, settings.patience)
        if stop_epoch is not None and stop_epoch < ckpt["epoch"]:
            tqdm.write(f"{ckpt_path}: patience {settings.patience} stops this run at epoch {stop_epoch}, "
                       f"before the checkpoint's epoch {ckpt['epoch']}; starting fresh")
            ckpt = None
    resumed = ckpt is not None
    if ckpt is None:
        seed_everything(settings.seed)
        epoch, batch_done, step = 0, 0, 0
        sums: dict[str, float] = {}
        epoch_seconds = 0.0
        history: list[dict[str, float]] = []
        best_state: dict[str, torch.Tensor] | None = None
        best_metric: float | None = None
        best_epoch, done, stopped_early = 0, False, False
    else:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if accelerator.scaler is not None and ckpt.get("scaler"):
            accelerator.scaler.load_state_dict(ckpt["scaler"])
        epoch, batch_done, step = ckpt["epoch"], ckpt["batch"], ckpt["step"]
        sums, epoch_seconds = dict(ckpt["sums"]), ckpt["epoch_seconds"]
        history = [dict(r) for r in ckpt["history"]]
        best_state, best_metric, best_epoch = ckpt["best_state"], ckpt["best_metric"], ckpt["best_epoch"]
        stopped_early = stop_epoch is not None
        done = stopped_early or epoch == settings.epochs
        if done:
            tqdm.write(replay_message(desc, state_dir))
        else:
            tqdm.write(f"{desc}: resuming from {ckpt_path} (epoch {epoch + 1}, batch {batch_done}/{batches_per_epoch})")

    def save() -> None:
        if not accelerator.is_main_process:  # one writer; every process reads the same file on resume
            return
        _save_atomic(
            {
                "format": FORMAT_VERSION,
                "run_key": run_key,
                "settings": asdict(settings),
                "epoch": epoch,
                "batch": batch_done,
                "step": step,
                "sums": sums,
                "epoch_seconds": epoch_seconds,
                "history": history,
                "best_state": best_state,
                "best_metric": best_metric,
                "best_epoch": best_epoch,
                "done": done,
                "stopped_early": stopped_early,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                "rng": _rng_state(),
            },
            ckpt_path,
        )

    # ------------------------------------------------------------------------ the loop
    while not done:
        batches = iter(make_batches(epoch))
        if batch_done:
            skipped = sum(1 for _ in itertools.islice(batches, batch_done))
            if skipped != batch_done:
                raise RuntimeError(f"{desc}: epoch {epoch + 1} has {skipped} batches, checkpoint says {batch_done} were done")
        if resumed and ckpt is not None:
            _set_rng_state(ckpt["rng"])  # after rebuilding the epoch: batch construction may not touch it
            ckpt = None
        model.train()
        bar = tqdm(
            total=batches_per_epoch,
            initial=batch_done,
            desc=f"{desc} {epoch + 1}/{settings.epochs}",
            unit="batch",
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )
        started = time.perf_counter()
        window: list[Any] = []
        for batch in batches:
            window.append(batch)
            last = batch_done + len(window) == batches_per_epoch
            if len(window) < settings.grad_accum and not last:
                continue
            for i, micro in enumerate(window):
                # only the window's last backward needs to all-reduce gradients (multi-process runs)
                sync = accelerator.no_sync(model) if i < len(window) - 1 else contextlib.nullcontext()
                with sync:
                    with accelerator.autocast():
                        loss, logs = compute_loss(model, _to_device(micro, accelerator.device))
                    if not torch.isfinite(loss):
                        raise FloatingPointError(
                            f"{desc}: loss is {loss.item()} at epoch {epoch + 1}, batch {batch_done + i + 1}; "
                            "lower the learning rate or use mixed_precision: no"
                        )
                    accelerator.backward(loss / len(window))
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                sums["_batches"] = sums.get("_batches", 0.0) + 1.0
            if settings.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), settings.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_done += len(window)
            bar.update(len(window))
            window = []
            bar.set_postfix({k: f"{v / sums['_batches']:.4f}" for k, v in sums.items() if not k.startswith("_")}, refresh=False)
            if step % settings.checkpoint_every == 0 and not last:
                epoch_seconds += time.perf_counter() - started
                started = time.perf_counter()
                save()
        bar.close()
        epoch_seconds += time.perf_counter() - started
        if batch_done != batches_per_epoch:
            raise RuntimeError(f"{desc}: epoch {epoch + 1} yielded {batch_done} batches, expected batches_per_epoch={batches_per_epoch}")

        # -------------------------------------------------------------- end of epoch
        n = sums.pop("_batches", 1.0)
        record: dict[str, float] = {"epoch": epoch + 1, "step": step, "lr": scheduler.get_last_lr()[0]}
        record.update({k: v / n for k, v in sums.items()})
        record["seconds"] = epoch_seconds
        final_epoch = epoch + 1 == settings.epochs
        if validate is not None and ((epoch + 1) % settings.validate_every == 0 or final_epoch):
            model.eval()
            with torch.no_grad():
                metrics = validate(raw_model)
            model.train()
            if select_metric not in metrics:
                raise KeyError(f"{desc}: validate() returned {sorted(metrics)}, no {select_metric!r} (select_metric)")
            record.update({f"valid_{k}": float(v) for k, v in metrics.items()})
            value = float(metrics[select_metric])
            if best_metric is None or value > best_metric:
                best_metric, best_epoch = value, epoch + 1
                best_state = _cpu_state(raw_model)
        history.append(record)
        stopped_early = stop_epoch_of(history, select_metric, settings.patience) is not None
        shown = ", ".join(f"{k} {v:.4g}" for k, v in record.items() if k not in ("epoch", "step"))
        tqdm.write(f"{desc} epoch {epoch + 1}: {shown}")
        if on_epoch_end is not None:
            on_epoch_end(epoch + 1, record)
        epoch, batch_done, sums, epoch_seconds = epoch + 1, 0, {}, 0.0
        done = stopped_early or epoch == settings.epochs
        if done and best_state is None:
            best_state, best_epoch = _cpu_state(raw_model), epoch
        save()

    if best_state is None:  # a resumed finished run without validation
        best_state = _cpu_state(raw_model)
    raw_model.load_state_dict(best_state)
    return FitResult(
        history=history,
        best_epoch=best_epoch,
        best_metric=best_metric,
        best_state=best_state,
        steps=step,
        stopped_early=stopped_early,
        resumed=resumed,
        mixed_precision=settings.mixed_precision,
    )
