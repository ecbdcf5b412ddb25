"""Speed and memory of the full-catalog evaluator against a bare reference, same run.

    python -m benchmarks.bench_evaluate            # ML-1M shape + 100k x 50k (a few minutes)
    python -m benchmarks.bench_evaluate --quick    # small shapes, seconds

Workloads (random 64-d embeddings, random histories, one random target per user):
  (a) 6,040 users x 3,706 items, histories ML-1M-like (mean ~160, 18..1000 items)
  (b) 100,000 users x 50,000 items, shorter histories (mean ~50, 3..200), and the same at 25,000
      users to show the working memory does not grow with the number of users.

Modes, each measured in a fresh subprocess so every peak is its own:
  bare        the reference: per chunk of users one matrix product and the rank count
              ``(scores >= target_score).sum(1)``; no masking, no padding, no NaN check.
  bare-tiled  the same, counted in cache-sized row tiles through one reused buffer: the bare
              reference written the way the evaluator works, so bare-tiled -> embeddings is the
              cost of masking + padding + NaN screen alone.
  embeddings  ``evaluate_embeddings`` with history masking (what SASRec/Molar use).
  scorer      ``evaluate_scorer`` with history masking and a score_fn returning ``u @ items.T``.

Time is the best of ``repeats`` rounds, modes interleaved within each round (the machine may be
shared; the minimum is the least noisy estimate); it includes flattening the Python history
lists and computing the metrics. Wall and CPU (user + system) seconds are both shown. Peak memory is the rise of the process's
resident-set high-water mark over the evaluation (reset via /proc/self/clear_refs after the
inputs are built), so it is the evaluator's working memory, not its inputs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

DIM = 64


@dataclass(frozen=True)
class Workload:
    name: str
    users: int
    items: int
    mean_len: int
    min_len: int
    max_len: int
    repeats: int


def workloads(quick: bool) -> list[Workload]:
    if quick:
        return [
            Workload("(a) small", 1000, 3706, 160, 18, 1000, 2),
            Workload("(b) 2k users", 2000, 50000, 50, 3, 200, 2),
            Workload("(b) 8k users", 8000, 50000, 50, 3, 200, 2),
        ]
    return [
        Workload("(a) ML-1M shape", 6040, 3706, 160, 18, 1000, 5),
        Workload("(b) 25k users", 25000, 50000, 50, 3, 200, 2),
        Workload("(b) 100k users", 100000, 50000, 50, 3, 200, 2),
    ]


MODES = ("bare", "bare-tiled", "embeddings", "scorer")


# ------------------------------------------------------------------------------- the worker


def build_inputs(w: Workload, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    user_emb = torch.from_numpy(rng.standard_normal((w.users, DIM), dtype=np.float32))
    item_emb = torch.from_numpy(rng.standard_normal((w.items + 1, DIM), dtype=np.float32))
    targets = torch.from_numpy(rng.integers(1, w.items + 1, w.users))
    extra = rng.geometric(1.0 / (w.mean_len - w.min_len + 1), w.users) - 1
    lengths = np.minimum(w.min_len + extra, w.max_len)
    flat = rng.integers(1, w.items + 1, int(lengths.sum()))
    histories = [part.tolist() for part in np.split(flat, np.cumsum(lengths)[:-1])]
    return user_emb, item_emb, targets, histories


def bare_reference(user_emb, item_emb, targets, chunk_size, ks):
    """One matrix product and one rank count per chunk of users: nothing else."""
    import torch

    ranks = torch.empty(user_emb.shape[0], dtype=torch.long)
    item_t = item_emb.T
    for start in range(0, user_emb.shape[0], chunk_size):
        stop = min(start + chunk_size, user_emb.shape[0])
        scores = user_emb[start:stop] @ item_t
        target_score = scores.gather(1, targets[start:stop, None])
        ranks[start:stop] = (scores >= target_score).sum(1) - 1
    return ranks_to_metrics(ranks, ks)


def bare_tiled_reference(user_emb, item_emb, targets, chunk_size, ks):
    """The bare reference counted in cache-sized tiles through one reused buffer (as the evaluator)."""
    import torch

    from molar import evaluate as ev

    n_users, n_cols = user_emb.shape[0], item_emb.shape[0]
    buffers = ev._TileBuffers(n_cols, torch.float32, torch.device("cpu"), chunk_size)
    ranks = torch.empty(n_users, dtype=torch.long)
    item_t = item_emb.T
    for start in range(0, n_users, chunk_size):
        stop = min(start + chunk_size, n_users)
        for a in range(start, stop, buffers.rows):
            b = min(a + buffers.rows, stop)
            tile = torch.mm(user_emb[a:b], item_t, out=buffers.scores[: b - a])
            target_score = tile.gather(1, targets[a:b, None])
            ranks[a:b] = tile.ge_(target_score).sum(1) - 1
    return ranks_to_metrics(ranks, ks)


def ranks_to_metrics(ranks, ks):
    import torch

    out = {}
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float((hit / torch.log2(ranks.double() + 2)).mean())
        out[f"recall@{k}"] = float(hit.double().mean())
    return out


def run_mode(mode, user_emb, item_emb, targets, histories, chunk_size, ks):
    from molar.evaluate import evaluate_embeddings, evaluate_scorer

    if mode == "bare":
        return bare_reference(user_emb, item_emb, targets, chunk_size, ks)
    if mode == "bare-tiled":
        return bare_tiled_reference(user_emb, item_emb, targets, chunk_size, ks)
    if mode == "embeddings":
        return evaluate_embeddings(user_emb, item_emb, targets, histories, ks, chunk_size, progress=False)
    if mode == "scorer":
        item_t = item_emb.T
        position = iter(range(0, user_emb.shape[0], chunk_size))

        def score_fn(batch):
            start = next(position)
            return user_emb[start : start + len(batch)] @ item_t

        return evaluate_scorer(score_fn, histories, targets, item_emb.shape[0] - 1, ks, True, chunk_size, progress=False)
    raise ValueError(f"unknown mode {mode!r}; one of {MODES}")


def _status_kib() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {key: int(re.search(rf"{key}:\s+(\d+)", text).group(1)) for key in ("VmRSS", "VmHWM")}


def worker(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    w = Workload(**spec["workload"])
    inputs = build_inputs(w)
    gc.collect()
    try:  # reset the high-water mark to the current RSS, so the peak below is the evaluation's
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        peak_of = lambda: _status_kib()["VmHWM"]  # noqa: E731
    except OSError:  # no reset: the peak can only be seen if it exceeds the setup's
        peak_of = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # noqa: E731
    base = _status_kib()["VmRSS"]
    usage = lambda: sum(resource.getrusage(resource.RUSAGE_SELF)[:2])  # noqa: E731 - user + system
    t0, c0 = time.perf_counter(), usage()
    metrics = run_mode(spec["mode"], *inputs, spec["chunk_size"], spec["ks"])
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": usage() - c0,
            "peak_mib": (peak_of() - base) / 1024, "inputs_mib": base / 1024, "metrics": metrics}


# --------------------------------------------------------------------------------- the driver


def measure(mode: str, w: Workload, args) -> dict:
    spec = {"mode": mode, "workload": asdict(w), "chunk_size": args.chunk_size, "ks": [10, 20], "threads": args.threads}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_evaluate", "--worker", json.dumps(spec)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {mode} {w.name} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds), for a smoke run")
    parser.add_argument("--chunk-size", type=int, default=1024, help="users per chunk, all modes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per measurement")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    print(f"chunk_size={args.chunk_size} threads={args.threads} dim={DIM} ks=[10, 20]; load average "
          f"{os.getloadavg()[0]:.1f} at start")
    print("time: best of the rounds (modes interleaved, one fresh process each); wall and CPU seconds\n")
    header = (f"{'workload':16} {'users':>7} {'items':>6} {'mode':>10} {'wall s':>8} {'x bare':>7} {'cpu s':>8} "
              f"{'x bare':>7} {'x tiled':>8} {'peak MiB':>9} {'ndcg@10':>8}")
    print(header)
    print("-" * len(header))
    results: dict[tuple[str, str], dict] = {}
    for w in workloads(args.quick):
        runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
        for _ in range(w.repeats):  # interleaved, so a burst of load on the machine hits every mode
            for mode in MODES:
                runs[mode].append(measure(mode, w, args))
        for mode in MODES:
            results[(w.name, mode)] = {
                "seconds": min(r["seconds"] for r in runs[mode]),
                "cpu_seconds": min(r["cpu_seconds"] for r in runs[mode]),
                "peak_mib": max(r["peak_mib"] for r in runs[mode]),
                "inputs_mib": runs[mode][0]["inputs_mib"],
                "metrics": runs[mode][0]["metrics"],
            }
        bare, tiled = results[(w.name, "bare")], results[(w.name, "bare-tiled")]
        for mode in MODES:
            r = results[(w.name, mode)]
            print(
                f"{w.name:16} {w.users:>7} {w.items:>6} {mode:>10} {r['seconds']:>8.3f} "
                f"{r['seconds'] / bare['seconds']:>7.2f} {r['cpu_seconds']:>8.3f} "
                f"{r['cpu_seconds'] / bare['cpu_seconds']:>7.2f} {r['seconds'] / tiled['seconds']:>8.2f} "
                f"{r['peak_mib']:>9.1f} {r['metrics']['ndcg@10']:>8.5f}",
                flush=True,
            )
    small, large = workloads(args.quick)[1:]
    print(f"\nWorking memory (peak MiB over the evaluation) vs users, {large.items} items:")
    for mode in MODES:
        a, b = results[(small.name, mode)]["peak_mib"], results[(large.name, mode)]["peak_mib"]
        print(f"  {mode:>10}: {small.users:>6} users {a:7.1f}   {large.users:>6} users {b:7.1f}   ratio {b / a:5.2f}")
    print("\nInputs held before the evaluation (embeddings + Python history lists), MiB:")
    for w in workloads(args.quick):
        print(f"  {w.name:16} {results[(w.name, 'embeddings')]['inputs_mib']:8.1f}")
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
