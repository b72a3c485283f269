"""Write one split's backbone features into a memory-mapped ``{split}_ims.npy``, on one or more
ranks, resumable after an interruption.

Ranks share the split in contiguous runs of whole batches (the batches are then exactly those a
single process forms, so the file is byte-identical to a one-process extraction). Rank 0
allocates ``{split}_ims.partial.npy``; every rank writes its rows into it and records them in its
own ``{split}_ims.progress[.<r>of<n>].json``; rank 0 waits for the others and renames the
finished file. The ranks meet only through these files (no process group): the same code runs
under ``extract.devices=N`` (spawned here), torchrun or SLURM tasks on a shared file system.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gpo_lit.errors import GpoLitError, expect, first_line
from gpo_lit.files import check_free_space, ensure_new, reserve, write_atomic

log = logging.getLogger("gpo_lit.extract")
_NPY_HEADER = 128  # bytes before the rows in a .npy file of this size (numpy aligns to 64)
_POLL_S = 0.2


class EvalImages(Dataset):
    """Images ``start … stop−1`` of a raw-image split in their evaluation view."""

    def __init__(self, split: Any, start: int = 0, stop: int | None = None) -> None:
        self.split, self.start = split, start
        self.stop = split.n_images if stop is None else stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.split.image(self.start + k))


def share(n_images: int, batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``rank``: a contiguous run of whole batches of the one-process
    extraction (``world`` runs of ⌈n / batch_size⌉ batches, as equal as they divide)."""
    n_batches = -(-n_images // batch_size)
    lo, hi = (n_batches * r // world * batch_size for r in (rank, rank + 1))
    return min(lo, n_images), min(hi, n_images)


def progress_path(out_dir: Path, name: str, rank: int, world: int) -> Path:
    """The progress record of ``rank`` (one process: ``{name}_ims.progress.json``)."""
    tag = "" if world == 1 else f".{rank}of{world}"
    return out_dir / f"{name}_ims.progress{tag}.json"


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically and on disk (progress records vouch for flushed rows)."""
    write_atomic(path, json.dumps(obj, indent=1).encode(), sync=True)


def _read_json(path: Path) -> dict:
    """A progress record, or ``{}`` where there is none or it is not one (a torn or edited file
    vouches for no rows)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    done = state.get("done") if isinstance(state, dict) else None
    return state if isinstance(done, int) and not isinstance(done, bool) else {}


def write_lines(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path``, or check that an existing ``path`` holds exactly them."""
    text = "".join(f"{ln}\n" for ln in lines)
    if path.exists():
        expect(
            path.read_text(encoding="utf-8") == text,
            path,
            f"the {len(lines)} lines of the split being extracted (never overwritten)",
            "a different file; remove it or choose another extract.out_dir",
        )
        return
    write_atomic(path, text.encode("utf-8"))


def _wait(ready: Callable[[], bool], stalled: Callable[[], str | None], wait_s: float) -> None:
    """Poll ``ready`` until true; give up when ``stalled`` has named the same state (nothing
    moved) for ``wait_s`` seconds."""
    last, since = None, time.monotonic()
    while not ready():
        state = stalled()
        if state != last:
            last, since = state, time.monotonic()
        elif time.monotonic() - since > wait_s:
            raise GpoLitError(str(state))
        time.sleep(_POLL_S)


@torch.no_grad()
def extract_split(
    encoder: Any,
    split: Any,
    out_dir: Path,
    *,
    settings: dict[str, Any],
    pool_grid: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    flush_every: int = 20,
    progress: bool = True,
    rank: int = 0,
    world: int = 1,
    wait_s: float = 1800.0,
) -> Path:
    """Write this rank's rows of one split; resume an interrupted run with the same ``settings``.

    Args:
        encoder: a grid or ViT encoder (only its backbone, ``grid()``, runs, in eval mode).
        split: an :class:`~gpo_lit.data.formats.images.ImageSplit` (or any reader with ``image(i)``).
        out_dir: destination folder (created).
        settings: what determines the features (backbone, weights, image pipeline, pooling);
            stored with the progress and in ``features_meta.json``; a resume must match it.
        pool_grid: average-pool the feature map to ``pool_grid × pool_grid`` cells.
        flush_every: flush rows and record progress every this many batches.
        rank, world: this process's share (:func:`share`); rank 0 allocates and finishes.
        wait_s: give up waiting for another rank when its progress has not moved this long.

    Returns:
        the path of ``{split}_ims.npy`` (on rank 0 finished; on other ranks still to be renamed).
    """
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    name = split.split
    final = out_dir / f"{name}_ims.npy"
    partial = out_dir / f"{name}_ims.partial.npy"
    mine = progress_path(out_dir, name, rank, world)
    ensure_new(final, "finished features are kept; remove it or choose another extract.out_dir")
    encoder.eval().to(device)
    dtype = torch.bfloat16 if bf16 else None

    def cells(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=bf16):
            out = encoder.grid(x, pool_grid)
        return out.float().cpu().numpy()

    probe = cells(torch.from_numpy(split.image(0))[None])
    shape = (split.n_images, *probe.shape[1:])
    key = {"settings": settings, "split": name, "shape": list(shape), "ranks": world}
    lo, hi = share(shape[0], batch_size, rank, world)
    # The rows are written through a memory map: space missing on disk would be a SIGBUS later,
    # so it is checked first and then allocated for the whole file (rows × cells × C × 4 bytes).
    size = _NPY_HEADER + 4 * int(np.prod(shape))
    what = f"{shape[0]} images × {shape[1]} cells × {shape[2]} float32 features"
    lead = progress_path(out_dir, name, 0, world)

    def matches(state: dict) -> bool:
        return {k: state.get(k) for k in key} == key

    if rank == 0 and not partial.exists():
        mine.unlink(missing_ok=True)  # a record without its file vouches for nothing
        check_free_space(partial, size, what)
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        try:
            reserve(partial, os.path.getsize(partial), what)
        except BaseException:
            del mm
            partial.unlink()  # made just now, holds nothing
            raise
        del mm
        for r in range(1, world):  # records of an earlier, abandoned partial file
            progress_path(out_dir, name, r, world).unlink(missing_ok=True)
        write_json(mine, {**key, "done": lo})
    elif rank != 0:  # rank 0 allocates (or vouches for) the file before anyone writes into it
        _wait(
            lambda: matches(_read_json(lead)),
            lambda: (
                f"{lead}: expected rank 0 to start this extraction with the same settings "
                f"within extract.rank_wait_s={wait_s:g} s, found "
                f"{'no record' if not lead.exists() else 'another extraction'}"
            ),
            wait_s,
        )
    state = _read_json(mine)
    if rank == 0 or state:
        expect(
            matches(state),
            partial,
            f"an interrupted extraction with the same settings ({mine.name}) to resume",
            "other settings or no progress file; remove it to start again",
        )
    start = int(state.get("done", lo))
    expect(lo <= start <= hi, mine, f"rows done within this rank's share {lo}…{hi}", start)
    if start > lo:
        log.info("%s: rank %d resuming at image %d of %d…%d", partial, rank, start, lo, hi)
    else:
        check_free_space(partial, size - 512 * partial.stat().st_blocks, f"the rest of {what}")
    try:
        # Read-only first: a file shorter than its header says fails there, where "r+" would
        # extend it with zeros that its progress record vouches for.
        np.lib.format.open_memmap(partial, mode="r")
        mm = np.lib.format.open_memmap(partial, mode="r+")
    except (OSError, ValueError) as err:  # truncated, or not an .npy file at all
        raise GpoLitError(
            f"{partial}: expected the interrupted extraction's {what}, found "
            f"{partial.stat().st_size} bytes that do not read as them ({first_line(err)}); "
            "remove it and its progress file to start again"
        ) from None
    expect(
        mm.shape == shape and mm.dtype == np.float32,
        partial,
        f"float32 features of shape {shape}",
        f"{mm.dtype} of shape {mm.shape}",
    )

    others = [progress_path(out_dir, name, r, world) for r in range(1, world)]
    shares = [share(shape[0], batch_size, r, world) for r in range(1, world)]

    def others_done() -> int:
        return sum(
            int(_read_json(p).get("done", s[0])) - s[0] for p, s in zip(others, shares, strict=True)
        )

    loader = DataLoader(
        EvalImages(split, start, hi),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    row = recorded = start
    show = progress and rank == 0
    bar = tqdm(
        total=shape[0],
        initial=start + (others_done() if show else 0),
        unit="img",
        desc=f"{name} features",
        disable=not show,
    )
    for b, images in enumerate(loader, 1):
        feats = cells(images)
        mm[row : row + len(feats)] = feats
        row += len(feats)
        bar.update(len(feats))
        if b % flush_every == 0:
            mm.flush()  # rows on disk before the progress file says so
            write_json(mine, {**key, "done": row})
            recorded = row
            if show and others:  # one bar for all ranks, refreshed from their records
                bar.n = row + others_done()
                bar.refresh()
    mm.flush()
    del mm
    expect(row == hi, partial, f"rows {lo}…{hi} written", row)
    if recorded != hi:  # the last record: rank 0 then removes it (written once, never after)
        write_json(mine, {**key, "done": hi})
    if rank != 0:
        return final

    def all_done() -> bool:
        return all(
            int(_read_json(p).get("done", -1)) == s[1] for p, s in zip(others, shares, strict=True)
        )

    _wait(
        all_done,
        lambda: (
            f"{partial}: expected the other {world - 1} rank(s) to finish their rows, found "
            f"no progress in extract.rank_wait_s={wait_s:g} s "
            f"({others_done()} of {shape[0] - hi} rows done); rerun the same command to resume"
        ),
        wait_s,
    )
    bar.n = shape[0]
    bar.close()
    write_lines(out_dir / f"{name}_caps.txt", list(split.captions))
    if split.image_ids is not None:
        write_lines(out_dir / f"{name}_ids.txt", list(split.image_ids))
    os.replace(partial, final)
    for p in (mine, *others):
        p.unlink()
    return final
