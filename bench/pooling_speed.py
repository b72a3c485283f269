"""Forward + backward time of GPO vs max pooling on BUTD-region-sized batches.

B=128 sets of N=36 regions, D=1024, lengths as after region size augmentation (each region kept
with p=0.8, at least one; on the benchmark device, as after a Lightning batch transfer). Both
operators are timed side by side in one run: warm-up, then the median of several repeats of the
wall-clock time (synchronised); on CUDA also the GPU time with the host running ahead.
Usage: ``PYTHONPATH=src python bench/pooling_speed.py [--device cuda] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gpo_lit.pooling import create_pooling


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(pool, x: torch.Tensor, lengths: torch.Tensor, device: torch.device) -> float:
    """Seconds for one forward + backward (gradients into the features and the parameters)."""
    x = x.detach().requires_grad_(True)
    sync(device)
    t0 = time.perf_counter()
    pool(x, lengths).sum().backward()
    sync(device)
    return time.perf_counter() - t0


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--keep", type=float, default=0.8, help="region keep probability")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    b, n, d = args.batch, args.regions, args.dim
    pools = {name: create_pooling(name, dim=d).to(device).train() for name in ("max", "gpo")}
    times: dict[str, list[float]] = {name: [] for name in pools}
    dev_times: dict[str, list[float]] = {name: [] for name in pools}
    n_distinct = []
    for step in range(args.warmup + args.repeats):
        # Fresh lengths every step, as in training: ~Binomial(n, keep), clamped to >= 1.
        lengths = torch.distributions.Binomial(n, torch.full((b,), args.keep)).sample()
        lengths = lengths.long().clamp(min=1).to(device)
        x = torch.randn(b, n, d, device=device)
        n_distinct.append(len(lengths.unique()))
        for name, pool in pools.items():  # interleaved so both see the same machine state
            t = time_step(pool, x, lengths, device)
            if step >= args.warmup:
                times[name].append(t)
                if device.type == "cuda":
                    dev_times[name].append(device_time(pool, x, lengths))

    med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
    print(
        f"device={device} B={b} N={n} D={d} keep={args.keep} threads={torch.get_num_threads()} "
        f"repeats={args.repeats} distinct lengths/batch={statistics.median(n_distinct):.0f}"
    )
    print(f"max pooling fwd+bwd: {med['max']:.2f} ms (median)")
    print(f"gpo pooling fwd+bwd: {med['gpo']:.2f} ms (median)")
    print(f"ratio gpo/max: {med['gpo'] / med['max']:.2f}x")
    if device.type == "cuda":
        dmed = {name: statistics.median(ts) * 1e3 for name, ts in dev_times.items()}
        print(
            f"GPU time with the host ahead: max {dmed['max']:.2f} ms, gpo {dmed['gpo']:.2f} ms, "
            f"ratio {dmed['gpo'] / dmed['max']:.2f}x"
        )
    print("target: <= 3x")


if __name__ == "__main__":
    main()
