"""Evaluation speed at COCO-5K size: one matmul vs ``evaluate(..., "full")`` vs a naive argsort,
and the whole COCO testall evaluation with ECCV Caption and CxC.

Random l2-normalised embeddings (5,000 images × 25,000 captions, d = 1024, 5 captions per image,
fixed seed). Side by side in one run:
  (a) one float32 matmul ``img @ cap.T`` of the full size (the floor: every method needs it);
  (b) ``gpo_lit.metrics.evaluate(img, cap, cap2img, "full")`` (sharded, exact, one matmul pass);
  (c) the authors' way: numpy similarity matrix, then ``argsort`` per image row and per caption
      column. It is slow, so it is timed on a subset of queries and extrapolated linearly;
  (d) the whole COCO-5K evaluation, ``evaluate_protocols(..., [coco_1k, coco_5k, eccv, cxc])``:
      R@K of both protocols plus top-500 lists scored by eccv-caption (images and captions get
      the package's COCO test ids; only at the default sizes, and when eccv-caption is installed).
  (e) memory at scale: ``retrieval_ranks`` on 25,000 images × 125,000 captions (the full matrix
      would be 12 GB) in a fresh subprocess, peak RSS above its inputs (target: within 1 GB).
Times are the min (and median) over alternating rounds (matmul then ours, ours then matmul, ...;
both under the same ``--threads``), wall clock and process CPU time (the latter is less sensitive
to other jobs on a shared machine; other jobs only ever add time, hence the min). Peak memory is measured once per
method in a fresh subprocess (see the printed method). Also checks ours == naive on the subset.

Usage: ``python bench/eval_speed.py [--device cuda] [--repeats 3] [--threads N] [--no-large]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gpo_lit
from gpo_lit.metrics import evaluate, evaluate_protocols, recall_metrics, retrieval_ranks
from gpo_lit.threads import load_average

MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def l2_random(n: int, d: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, d] unit rows, filled in place in chunks (no transient copy that would skew peak RSS)."""
    x = torch.empty(n, d, device=device)
    for c in range(0, n, 4096):
        blk = x[c : c + 4096]
        blk.copy_(torch.randn(blk.shape, generator=gen))
        blk.div_(torch.linalg.vector_norm(blk, dim=1, keepdim=True))
    return x


def make_data(args: argparse.Namespace, device: torch.device):
    gen = torch.Generator().manual_seed(args.seed)
    img = l2_random(args.n_img, args.dim, gen, device)
    cap = l2_random(args.n_img * args.per_image, args.dim, gen, device)
    cap2img = torch.arange(args.n_img, device=device).repeat_interleave(args.per_image)
    return img, cap, cap2img


def coco_ids(n_img: int, per_image: int):
    """The package's COCO 5K test ids for images 0..4999 with captions 5i..5i+4 (None if the
    sizes differ or eccv-caption is missing)."""
    if (n_img, per_image) != (5000, 5):
        return None
    try:
        from gpo_lit.metrics.eccv import CocoIds, _package
    except ImportError:
        return None
    m = _package()
    caps = np.asarray(m.coco_ids, dtype=np.int64)  # 5 consecutive captions per image
    imgs = np.array([m.coco_gts["t2i"][int(c)][0] for c in caps[::per_image]], dtype=np.int64)
    return CocoIds(imgs, caps, "eccv-caption's coco_test_ids")


def run_whole_coco(img, cap, cap2img, shard_size: int, ids) -> dict[str, dict[str, float]]:
    protocols = ["coco_1k", "coco_5k", "eccv", "cxc"]
    out = evaluate_protocols(img, cap, cap2img, protocols, shard_size, coco_ids=ids)
    sync(img.device)
    return out


def run_matmul(img: torch.Tensor, cap: torch.Tensor) -> None:
    sims = img @ cap.T
    sync(img.device)
    del sims


def run_ours(img, cap, cap2img, shard_size: int) -> dict[str, float]:
    out = evaluate(img, cap, cap2img, "full", shard_size=shard_size)
    sync(img.device)
    return out


def naive_subset(img: np.ndarray, cap: np.ndarray, cap2img: np.ndarray, n_iq: int, n_cq: int):
    """Authors'-style ranks for the first n_iq image and n_cq caption queries, with timings.

    Returns (i2t [n_iq], t2i [n_cq], seconds of: i2t matmul, i2t argsorts, t2i matmul, t2i argsorts).
    """
    caps_of = [np.flatnonzero(cap2img == i) for i in range(n_iq)]
    t0 = time.perf_counter()
    sims = img[:n_iq] @ cap.T  # [n_iq, n_cap] rows of the full matrix
    t1 = time.perf_counter()
    i2t = np.empty(n_iq, dtype=np.int64)
    for i in range(n_iq):
        order = np.argsort(sims[i])[::-1]
        i2t[i] = min(np.where(order == j)[0][0] for j in caps_of[i])
    t2 = time.perf_counter()
    sims_t = cap[:n_cq] @ img.T  # [n_cq, n_img]: columns of the full matrix
    t3 = time.perf_counter()
    t2i = np.empty(n_cq, dtype=np.int64)
    for j in range(n_cq):
        order = np.argsort(sims_t[j])[::-1]
        t2i[j] = np.where(order == cap2img[j])[0][0]
    t4 = time.perf_counter()
    return i2t, t2i, (t1 - t0, t2 - t1, t4 - t3, t3 - t2)


def peak_rss_bytes() -> int:
    """High-water RSS of this process: VmHWM (Linux), else ru_maxrss.

    ru_maxrss survives fork+exec, so a child would inherit its parent's peak; VmHWM belongs to the
    process's own address space and starts afresh at exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(args: argparse.Namespace) -> None:
    """Run one method once in this fresh process and print its peak memory above the data."""
    device = torch.device(args.device)
    img, cap, cap2img = make_data(args, device)
    sync(device)
    rss_base = peak_rss_bytes()
    on_gpu = device.type == "cuda" and args.child != "naive"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
        gpu_base = torch.cuda.memory_allocated(device)
    if args.child == "matmul":
        run_matmul(img, cap)
    elif args.child == "large":
        t0 = time.perf_counter()
        retrieval_ranks(img, cap, cap2img, args.shard_size)
        wall = time.perf_counter() - t0
    elif args.child == "ours":
        run_ours(img, cap, cap2img, args.shard_size)
    else:
        naive_subset(
            img.cpu().numpy(),
            cap.cpu().numpy(),
            cap2img.cpu().numpy(),
            args.naive_img,
            args.naive_cap,
        )
    if on_gpu:
        peak = torch.cuda.max_memory_allocated(device) - gpu_base
    else:
        peak = peak_rss_bytes() - rss_base
    inputs = sum(t.numel() * t.element_size() for t in (img, cap, cap2img))
    extra = {"wall_s": wall} if args.child == "large" else {}
    print(json.dumps({"peak_bytes": peak, "input_bytes": inputs, **extra}))


def peak_in_subprocess(method: str, argv: list[str]) -> float:
    return child_report(method, argv)["peak_bytes"] / MIB


def child_report(method: str, argv: list[str]) -> dict[str, float]:
    src = str(Path(gpo_lit.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, __file__, *argv, "--child", method],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def timed(fn, device: torch.device) -> tuple[float, float]:
    sync(device)
    w, c = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--n-img", type=int, default=5000)
    ap.add_argument("--per-image", type=int, default=5)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--naive-img", type=int, default=500, help="image queries timed naively")
    ap.add_argument("--naive-cap", type=int, default=2500, help="caption queries timed naively")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument(
        "--no-large", action="store_true", help="skip (e), 25K images x 125K captions (minutes)"
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)

    # Peak memory first, each method in a fresh process, before this one holds the data.
    peaks = {}
    if not args.no_memory:
        for m in ("matmul", "ours", "naive"):
            peaks[m] = peak_in_subprocess(m, sys.argv[1:])

    device = torch.device(args.device)
    img, cap, cap2img = make_data(args, device)
    n_img, n_cap = img.shape[0], cap.shape[0]
    print(
        f"data: {n_img} images x {n_cap} captions, d={args.dim}, float32, l2-normalised, "
        f"seed {args.seed}; device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {load_average()}"
    )

    # (a) and (b), interleaved so that background load hits both alike.
    run_ours(img, cap, cap2img, args.shard_size)  # warm-up (allocator, BLAS)
    times: dict[str, list[tuple[float, float]]] = {"matmul": [], "ours": []}
    runs = {
        "matmul": lambda: run_matmul(img, cap),
        "ours": lambda: run_ours(img, cap, cap2img, args.shard_size),
    }
    for r in range(args.repeats):  # alternating rounds: A/B, then B/A, ...
        for name in ("matmul", "ours") if r % 2 == 0 else ("ours", "matmul"):
            times[name].append(timed(runs[name], device))

    # (d) the whole COCO-5K evaluation (R@K + ECCV + CxC), when the ids exist.
    ids = coco_ids(n_img, args.per_image)
    if ids is not None:
        run_whole_coco(img, cap, cap2img, args.shard_size, ids)  # warm-up (package loaded)
        times["whole"] = [
            timed(lambda: run_whole_coco(img, cap, cap2img, args.shard_size, ids), device)
            for _ in range(args.repeats)
        ]

    # (c) naive on a subset, extrapolated linearly in the number of queries.
    img_np, cap_np, c2i_np = img.cpu().numpy(), cap.cpu().numpy(), cap2img.cpu().numpy()
    t0 = time.process_time()
    n_i2t, n_t2i, (mm_i, sort_i, mm_t, sort_t) = naive_subset(
        img_np, cap_np, c2i_np, args.naive_img, args.naive_cap
    )
    naive_cpu_subset = time.process_time() - t0
    f_img, f_cap = n_img / args.naive_img, n_cap / args.naive_cap
    # the full naive run computes the full matrix once (= the i2t rows scaled) plus all argsorts
    naive_wall = mm_i * f_img + sort_i * f_img + sort_t * f_cap
    naive_cpu = naive_cpu_subset * naive_wall / (mm_i + sort_i + mm_t + sort_t)

    def stat(m: str, k: int, f=min) -> float:
        return f(t[k] for t in times[m])

    mat_w, our_w = stat("matmul", 0), stat("ours", 0)
    mat_c, our_c = stat("matmul", 1), stat("ours", 1)
    full_matrix = n_img * n_cap * 4 / MIB
    rows = [
        (
            "(a) one fp32 matmul img @ cap.T",
            mat_w,
            stat("matmul", 0, statistics.median),
            mat_c,
            peaks.get("matmul"),
            f"[{n_img}, {n_cap}] output",
        ),
        (
            '(b) ours: evaluate(..., "full")',
            our_w,
            stat("ours", 0, statistics.median),
            our_c,
            peaks.get("ours"),
            f"shards of {args.shard_size} images",
        ),
        (
            "(c) naive argsort (numpy)",
            naive_wall,
            float("nan"),
            naive_cpu,
            peaks.get("naive"),
            f"EXTRAPOLATED from {args.naive_img} img + {args.naive_cap} cap queries",
        ),
    ]
    if "whole" in times:
        rows.append(
            (
                "(d) whole COCO 5K: 1K+5K+ECCV+CxC",
                stat("whole", 0),
                stat("whole", 0, statistics.median),
                stat("whole", 1),
                None,
                "R@K of coco_1k, coco_5k; top-500 lists -> eccv-caption",
            )
        )
    print(f"\n{'method':34s} {'wall s':>8s} {'(median)':>9s} {'cpu s':>8s} {'peak MiB':>9s}  note")
    for name, w, wm, c, pk, note in rows:
        pk_s = f"{pk:9.0f}" if pk is not None else f"{'-':>9s}"
        wm_s = f"{wm:9.4f}" if wm == wm else f"{'':9s}"
        print(f"{name:34s} {w:8.4f} {wm_s} {c:8.3f} {pk_s}  {note}")
    print(
        f"naive subset measured: {mm_i:.2f} s + {mm_t:.2f} s numpy matmuls, "
        f"{sort_i:.2f} s for {args.naive_img} image argsorts, {sort_t:.2f} s for "
        f"{args.naive_cap} caption argsorts; full = matmul x{f_img:.0f} + image sorts x{f_img:.0f}"
        f" + caption sorts x{f_cap:.0f}"
    )
    if peaks:
        how = (
            "torch.cuda.max_memory_allocated above the data (naive: host ru_maxrss)"
            if device.type == "cuda"
            else "peak RSS (VmHWM) of a fresh subprocess minus its peak right after creating the data"
        )
        print(
            f"peak memory: {how}; naive peak is for its subset (the full naive matrix alone is "
            f"{full_matrix:.0f} MiB)"
        )
    print(
        f"\nratios: ours/matmul = {our_w / mat_w:.2f}x wall, {our_c / mat_c:.2f}x cpu; "
        f"naive/ours = {naive_wall / our_w:.1f}x wall"
    )
    print("target: ours <= 1.25x matmul")
    if "whole" in times:
        print(
            f"whole COCO-5K evaluation (R@K + ECCV + CxC) = {stat('whole', 0) / our_w:.1f}x the "
            f"R@K-only evaluation (b), {stat('whole', 0):.2f} s wall"
        )

    # Check ours == naive on the subset. float32: two different matmuls may round a near-tie
    # differently, so agreement is reported; float64: exact equality is asserted.
    o_i2t, o_t2i = retrieval_ranks(img, cap, cap2img, args.shard_size)
    eq32 = int((o_i2t[: args.naive_img].cpu().numpy() == n_i2t).sum()) + int(
        (o_t2i[: args.naive_cap].cpu().numpy() == n_t2i).sum()
    )
    total = args.naive_img + args.naive_cap
    img64, cap64 = img.double(), cap.double()
    o_i2t, o_t2i = retrieval_ranks(img64, cap64, cap2img, args.shard_size)
    n_i2t, n_t2i, _ = naive_subset(
        img64.cpu().numpy(), cap64.cpu().numpy(), c2i_np, args.naive_img, args.naive_cap
    )
    ok64 = np.array_equal(o_i2t[: args.naive_img].cpu().numpy(), n_i2t) and np.array_equal(
        o_t2i[: args.naive_cap].cpu().numpy(), n_t2i
    )
    print(
        f"check ours == naive on the subset: float64 {'OK' if ok64 else 'MISMATCH'}; "
        f"float32 {eq32}/{total} queries equal"
    )
    m = recall_metrics(o_i2t, o_t2i)
    print(
        f"(random data: rsum {m['rsum']:.2f}, i2t_r1 {m['i2t_r1']:.2f}, t2i_r1 {m['t2i_r1']:.2f})"
    )
    if not args.no_large and not args.child:
        r = child_report("large", [*sys.argv[1:], "--n-img", str(5 * n_img)])
        above = r["peak_bytes"] / MIB
        print(
            f"(e) retrieval_ranks on {5 * n_img} images x {5 * n_cap} "
            f"captions: {r['wall_s']:.1f} s wall, peak {above:.0f} MiB above its "
            f"{r['input_bytes'] / MIB:.0f} MiB of inputs (target: within 1024 MiB), "
            f"{load_average()}"
        )
    if not ok64:
        sys.exit(1)


if __name__ == "__main__":
    main()
