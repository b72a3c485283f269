"""Forward + backward time and saved-for-backward memory of GPO vs max pooling, over a grid.

Grid: B ∈ {32, 128, 512} sets × N ∈ {36, 100, 256} elements, D = 1024, at 1 and 2 CPU threads
(``torch.set_num_threads``); lengths as after region size augmentation (each element kept with
p=0.8, at least one; on the benchmark device, as after a Lightning batch transfer). In each cell
both operators are timed in alternating rounds (A/B, then B/A, on the same batch, so both see the
same machine state): warm-up, then the minimum over the rounds of the wall-clock and of the
process-CPU time (synchronised; fewer rounds in large cells): on a shared machine other jobs only
ever add time, so the minimum is the least disturbed figure. On CUDA also the GPU time with the
host running ahead. The load average is printed at the start, before each thread count, and at
the end. "worker busy": the CPU time of the intra-op worker threads (OpenMP's, which spin between
parallel regions) over the wall time of the operator's rounds, read from ``/proc`` (0 elsewhere):
near 1 at 2 threads means the second core was never free for other threads (GPO's sort bands).

Memory: the bytes of the tensors autograd saves for backward (``saved_tensors_hooks``; each
storage counted once, parameters included) divided by the input's bytes: what a forward keeps
alive until backward, per operator. It is deterministic, unlike a peak-RSS reading.
Cells with B*N > 128*256 only with ``--full``.
Usage: ``PYTHONPATH=src python bench/pooling_speed.py [--device cuda] [--full] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from gpo_lit.pooling import create_pooling
from gpo_lit.threads import load_average

MAX_CELL = 128 * 256  # B*N of the largest cell timed by default (keeps the grid to ~3 minutes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(
    pool, x: torch.Tensor, lengths: torch.Tensor, device: torch.device
) -> tuple[float, float]:
    """Wall and process-CPU seconds for one forward + backward (gradients into the features and
    the parameters). CPU time is the steadier of the two on a loaded machine (time spent waiting
    for a core is not in it; threads spinning at a barrier are)."""
    x = x.detach().requires_grad_(True)
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    pool(x, lengths).sum().backward()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def native_worker_cpu() -> float:
    """Process-CPU seconds so far of the threads Python did not start, the main thread aside:
    the intra-op (OpenMP) workers, which spin between parallel regions before they sleep; 0.0
    where ``/proc`` has no per-thread times."""
    python = {t.native_id for t in threading.enumerate()}
    total = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            if int(tid) in python:
                continue
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    except OSError:  # no /proc (not Linux), or a thread exited while listed
        return 0.0
    return total / os.sysconf("SC_CLK_TCK")


def saved_bytes(pool, x: torch.Tensor, lengths: torch.Tensor) -> int:
    """Bytes of the tensors saved for backward by one forward (each storage once)."""
    seen: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[(t.untyped_storage().data_ptr(), t.storage_offset())] = t.numel() * t.element_size()
        return t

    x = x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = pool(x, lengths)
    del out
    return sum(seen.values())


def device_time(pool, x: torch.Tensor, lengths: torch.Tensor) -> float:
    """Seconds of GPU time for one forward + backward with the host running ahead (as in training,
    where the GPU is still busy with the encoders): a spin kernel holds the GPU while every kernel
    is queued, so host-side launch overhead is hidden unless the operator syncs."""
    x = x.detach().requires_grad_(True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(50_000_000)  # ~30 ms of GPU spinning
    start.record()
    pool(x, lengths).sum().backward()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def make_batch(b: int, n: int, d: int, keep: float, device: torch.device):
    """Features ``[b, n, d]`` and lengths ~Binomial(n, keep) clamped to >= 1, fresh per step."""
    lengths = torch.distributions.Binomial(n, torch.full((b,), keep)).sample()
    return torch.randn(b, n, d, device=device), lengths.long().clamp(min=1).to(device)


def run_cell(pools, b: int, n: int, d: int, args, device: torch.device) -> dict[str, float]:
    """Min fwd+bwd ms per operator over alternating rounds (and GPU ms on CUDA), wall and CPU
    time, saved/input ratio, distinct lengths."""
    # Repeats shrink with the cell's size so the whole grid stays within a few minutes.
    repeats = max(2, min(args.repeats, int(args.repeats * 32 * 36 / (b * n))))
    warmup = 1 if b * n > 128 * 100 else args.warmup
    times: dict[str, list[float]] = {name: [] for name in pools}
    cpu: dict[str, list[float]] = {name: [] for name in pools}
    dev: dict[str, list[float]] = {name: [] for name in pools}
    workers = {name: 0.0 for name in pools}  # native worker CPU seconds during the rounds
    distinct = []
    names = list(pools)
    for step in range(warmup + repeats):
        x, lengths = make_batch(b, n, d, args.keep, device)
        distinct.append(len(lengths.unique()))
        for name in names if step % 2 else names[::-1]:  # alternate which one goes first
            pool = pools[name]
            w0 = native_worker_cpu()
            t, c = time_step(pool, x, lengths, device)
            if step >= warmup:
                workers[name] += native_worker_cpu() - w0
                times[name].append(t)
                cpu[name].append(c)
                if device.type == "cuda":
                    dev[name].append(device_time(pool, x, lengths))
    res = {f"{k}_ms": min(v) * 1e3 for k, v in times.items()}
    res.update({f"{k}_cpu_ms": min(v) * 1e3 for k, v in cpu.items()})
    res.update({f"{k}_workers": workers[k] / sum(times[k]) for k in pools})
    if device.type == "cuda":
        res.update({f"{k}_gpu_ms": min(v) * 1e3 for k, v in dev.items()})
    in_bytes = x.numel() * x.element_size()
    for name, pool in pools.items():
        res[f"{name}_mem"] = saved_bytes(pool, x, lengths) / in_bytes
    res["distinct"] = statistics.median(distinct)
    res["repeats"] = repeats
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128, 512])
    ap.add_argument("--regions", type=int, nargs="+", default=[36, 100, 256])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.8, help="element keep probability")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9, help="rounds in the smallest cell")
    ap.add_argument(
        "--full",
        action="store_true",
        help=f"also the cells with B*N > {MAX_CELL} (B=512 x N>=100: minutes each on 2 cores)",
    )
    ap.add_argument("--smoke", action="store_true", help="a tiny grid that runs in seconds")
    ap.add_argument(
        "--nn-gru",
        action="store_true",
        help="GPO's generator through nn.GRU (model.pooling.cpu_kernels=false) "
        "instead of gpo_lit.pooling.gru_scan and the packed sort (cpu_kernels=true, the default)",
    )
    args = ap.parse_args()
    if args.smoke:
        args.batches, args.regions, args.threads, args.dim = [4], [5], [1], 16
        args.warmup, args.repeats = 1, 2

    device = torch.device(args.device)
    torch.manual_seed(0)
    d = args.dim
    extra = {"max": {}, "gpo": {"cpu_kernels": not args.nn_gru}}
    pools = {n: create_pooling(n, dim=d, **extra[n]).to(device).train() for n in ("max", "gpo")}
    print(f"device={device} D={d} keep={args.keep}; at start: {load_average()}")
    print(
        f"GPO generator: {'nn.GRU' if args.nn_gru else 'pooling.gru_scan + packed sort (cpu_kernels=true)'}"
    )
    gpu = " max GPU ms | gpo GPU ms |" if device.type == "cuda" else ""
    print(
        "| threads | B | N | max ms | gpo ms | gpo/max |"
        + gpu
        + " saved/input max | saved/input gpo | distinct lengths | repeats | gpo/max CPU time |"
        + " worker busy max | worker busy gpo |"
    )
    print("|" + "---|" * (13 + (2 if gpu else 0)))
    worst = worst_cpu = 0.0
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"| {threads} thread(s): {load_average()} |", flush=True)
        for b in args.batches:
            for n in args.regions:
                if b * n > MAX_CELL and not args.full:
                    print(f"| {threads} | {b} | {n} | skipped (--full) |", flush=True)
                    continue
                r = run_cell(pools, b, n, d, args, device)
                ratio = r["gpo_ms"] / r["max_ms"]
                cpu_ratio = r["gpo_cpu_ms"] / r["max_cpu_ms"]
                worst = max(worst, ratio)
                worst_cpu = max(worst_cpu, cpu_ratio)
                g = f" {r['max_gpu_ms']:.2f} | {r['gpo_gpu_ms']:.2f} |" if gpu else ""
                print(
                    f"| {threads} | {b} | {n} | {r['max_ms']:.2f} | {r['gpo_ms']:.2f} | "
                    f"{ratio:.2f}x |{g} {r['max_mem']:.2f} | {r['gpo_mem']:.2f} | "
                    f"{r['distinct']:.0f} | {r['repeats']} | {cpu_ratio:.2f}x | "
                    f"{r['max_workers']:.2f} | {r['gpo_workers']:.2f} |",
                    flush=True,
                )
    print(
        f"worst gpo/max: {worst:.2f}x wall, {worst_cpu:.2f}x CPU time (target <= 3x); "
        f"at end: {load_average()}"
    )


if __name__ == "__main__":
    main()
