"""Training-loader speed on SCAN precomp features: the old memory-map path vs positioned reads.

Writes an F30K-train-sized feature file (29,000 x 36 x 2048 float32, 8.6 GB; ``--rows`` fewer), then
loads the same random batches (region dropping p = 0.8, padded with the project's collate) through

- OLD: a copy of the previous reader and collate kept here as the baseline:
  ``np.load(mmap_mode="r")``, one row copied out of the map, its finiteness checked, the kept
  regions copied again, then a zero-filled batch allocated and each set copied into it;
- NEW: the training loader's path: :meth:`gpo_lit.data.formats.precomp.PrecompSplit.deferred_image` and
  :func:`gpo_lit.data.collate.pad_sets`, which reads each row (``os.preadv``) into a reused row
  buffer and copies the kept regions straight into an uninitialised batch (reused in the main
  process once nothing holds it; in shared memory inside a worker), zeroing only the padding,

with 0 and 2 workers, each first on a cold page cache (``posix_fadvise(DONTNEED)`` of the file: no
global cache drop needed) and then hot (the same batches again). It prints batches/s and the bytes
read per sample (``/proc/<pid>/io`` ``read_bytes`` of the process and its workers) against the
sample's own size. The file is deleted afterwards; the run refuses when the disk has less than
twice its size free. Usage: ``PYTHONPATH=src python bench/loader_speed.py [--rows 8000] [--smoke]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpo_lit.data.augment import drop_regions, kept_regions
from gpo_lit.data.collate import pad_sets
from gpo_lit.data.formats.precomp import PrecompSplit, RegionRead
from gpo_lit.errors import GpoLitError
from gpo_lit.threads import load_average


class OldRows(Dataset):
    """The previous reader's training path: memory map opened lazily per process, one row copied
    out, checked finite, then ``drop_regions`` (a second copy)."""

    def __init__(self, path: Path, p_keep: float) -> None:
        self.path, self.p_keep, self._mm = path, p_keep, None

    def __len__(self) -> int:
        return len(np.load(self.path, mmap_mode="r"))

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._mm is None:
            self._mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
        x = np.array(self._mm[i], dtype=np.float32)
        bad = (~np.isfinite(x[None])).reshape(1, -1).sum(axis=1)  # the old per-row check
        if bad.any():
            raise GpoLitError(f"{self.path}: expected finite features in row {i}")
        return torch.from_numpy(drop_regions(x, np.random.default_rng((0, 0, i)), self.p_keep))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_mm": None}


class NewRows(Dataset):
    """The project's reader: the kept regions of one row read with a positioned read."""

    def __init__(self, split: PrecompSplit, p_keep: float) -> None:
        self.split, self.p_keep = split, p_keep

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, i: int) -> RegionRead:
        keep = kept_regions(self.split.n_regions, np.random.default_rng((0, 0, i)), self.p_keep)
        return self.split.deferred_image(i, keep=keep)


def old_pad_sets(sets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous collate (baseline): a zero-filled new batch, each set copied into it."""
    lengths = torch.tensor([s.shape[0] for s in sets], dtype=torch.long)
    out = sets[0].new_zeros(len(sets), int(lengths.max()), *sets[0].shape[1:])
    for i, s in enumerate(sets):
        out[i, : s.shape[0]] = s
    return out, lengths


def collate(items: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return old_pad_sets(items) if isinstance(items[0], torch.Tensor) else pad_sets(items)


def write_features(path: Path, shape: tuple[int, int, int], chunk_rows: int = 256) -> None:
    """Random float32 features of ``shape`` in a .npy file, written in chunks (no 8 GB array)."""
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": shape}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, shape[0], chunk_rows):
            n = min(chunk_rows, shape[0] - start)
            f.write(rng.random((n, *shape[1:]), dtype=np.float32).tobytes())
        f.flush()
        os.fsync(f.fileno())  # dirty pages cannot be evicted


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def read_bytes(pids: list[int]) -> int:
    """Bytes these processes caused to be fetched from storage (``/proc/<pid>/io``)."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                total += int(line.split()[1])
    return total


def run_passes(
    dataset: Dataset, order: list[int], batch: int, workers: int, path: Path
) -> list[tuple[float, float]]:
    """(batches/s, bytes read per sample) of a cold pass and then a hot pass over ``order``."""
    kwargs = {"num_workers": workers, "persistent_workers": workers > 0}
    sampler: list[int] = []  # empty first: the workers start without reading anything
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, collate_fn=collate, **kwargs)
    it = iter(loader)
    pids = [os.getpid()] + [w.pid for w in getattr(it, "_workers", [])]
    list(it)
    sampler[:] = order
    out = []
    for cold in (True, False):
        if cold:
            evict(path)
        n_batches, before, t0 = 0, read_bytes(pids), time.perf_counter()
        for _ in loader:  # persistent workers: the same processes each pass
            n_batches += 1
        dt = time.perf_counter() - t0
        out.append((n_batches / dt, (read_bytes(pids) - before) / len(order)))
    del it, loader
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=29_000, help="rows of the file (F30K train)")
    ap.add_argument("--regions", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--batches", type=int, default=20, help="batches per pass")
    ap.add_argument("--dir", default=None, help="where to write the file (default: the temp dir)")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: seconds (tested)")
    args = ap.parse_args()
    if args.smoke:
        args.rows, args.dim, args.batch, args.batches = 400, 256, 16, 4
    shape = (args.rows, args.regions, args.dim)
    sample = args.regions * args.dim * 4
    size = args.rows * sample
    n = min(args.batches * args.batch, args.rows)
    where = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(where).free
    if free < 2 * size:
        print(
            f"error: --dir {where}: expected at least {2 * size / 1e9:.1f} GB free (twice the "
            f"file), found {free / 1e9:.1f} GB",
            file=sys.stderr,
        )
        sys.exit(2)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed run still deletes the file
    tmp = Path(tempfile.mkdtemp(prefix="loader_speed_", dir=where))
    try:
        path = tmp / "train_ims.npy"
        t0 = time.perf_counter()
        write_features(path, shape)
        print(
            f"wrote {path} {shape} float32, {size / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s"
        )
        (tmp / "train_caps.txt").write_text("a caption\n" * args.rows)
        order = np.random.default_rng(1).permutation(args.rows)[:n].tolist()
        print(load_average())
        print(
            f"{n // args.batch} batches of {args.batch} random rows per pass; a sample is "
            f"{sample / 1e3:.0f} KB ({args.regions} x {args.dim} float32)\n"
        )
        print("| reader | workers | cache | batches/s | MB read per sample | x sample size |")
        print("|---|---|---|---|---|---|")
        res: dict[tuple[str, int, str], tuple[float, float]] = {}
        for workers in (0, 2):
            for name in ("OLD", "NEW"):
                ds = (
                    OldRows(path, 0.8)
                    if name == "OLD"
                    else NewRows(PrecompSplit(tmp, "train"), 0.8)
                )
                for cache, (bps, per) in zip(
                    ("cold", "hot"), run_passes(ds, order, args.batch, workers, path), strict=True
                ):
                    res[name, workers, cache] = (bps, per)
                    print(
                        f"| {name} | {workers} | {cache} | {bps:.2f} | {per / 1e6:.3f} | {per / sample:.2f} |"
                    )
                del ds
        print()
        for workers in (0, 2):
            for cache in ("cold", "hot"):
                ratio = res["NEW", workers, cache][0] / res["OLD", workers, cache][0]
                print(f"NEW / OLD batches/s, {workers} workers, {cache}: {ratio:.2f}x")
        cold_new = res["NEW", 0, "cold"][1] / sample
        print(
            f"cold bytes read per sample, NEW, 0 workers: {cold_new:.2f}x the sample (target <= 1.5x)"
        )
        print(
            f"hot batches/s NEW / OLD at 0 workers: "
            f"{res['NEW', 0, 'hot'][0] / res['OLD', 0, 'hot'][0]:.2f}x (target >= 3x)"
        )
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
