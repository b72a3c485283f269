"""Reader for the SCAN "precomp" layout of precomputed region features (BUTD and friends).

A split ``<split>`` of a folder ``root`` is

- ``{split}_ims.npy``: float32 ``(N_rows, R, D)`` region features (e.g. 36 x 2048);
- ``{split}_caps.txt``: UTF-8, one caption per line, ``k`` per image (image i -> lines k*i .. k*i+k-1);
- ``{split}_ids.txt`` (optional): one image id per row of the features.

Old copies store every image ``k = 5`` times (one row per caption, ``N_rows == N_captions``); this is
detected from the ids file (ids repeated in consecutive groups of 5) or forced with
``repeated_images=True``, and then unique image i is row 5i and caption j belongs to image j // 5.

Everything cheap is validated on open (the ``.npy`` header, never the data); non-finite features
are checked per image on access, and for a whole split by :meth:`PrecompSplit.scan_finite`.

Rows are read with positioned reads (:mod:`gpo_lit.data.formats.npy`): only the requested bytes
come off the disk. The file is opened lazily in each process (a forked worker reopens it) and
never pickled. :func:`write_precomp_split` writes a split in this layout.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.formats.base import (
    ReaderBase,
    caption_blocks,
    count_nonfinite,
    lines_bytes,
    read_lines,
)
from gpo_lit.data.formats.npy import pread_into, read_npy_header
from gpo_lit.errors import GpoLitError, expect, require_file
from gpo_lit.files import write_atomic

REPEAT = 5  # old copies store each image this many times, one row per caption


def is_repeated(ids: Sequence[str]) -> bool:
    """Do ``ids`` (one per row) repeat each image in consecutive groups of :data:`REPEAT`?"""
    return len(ids) % REPEAT == 0 and all(ids[r] == ids[r - r % REPEAT] for r in range(len(ids)))


def _n_kept(keep: np.ndarray) -> int:
    """Rows a region selection (bool mask or indices) keeps."""
    keep = np.asarray(keep)
    return int(np.count_nonzero(keep)) if keep.dtype == np.bool_ else len(keep)


class PrecompSplit(ReaderBase):
    """One split of a SCAN precomp folder: unique images, their captions and the caption->image map.

    Attributes: ``n_images``, ``n_captions``, ``captions`` (list[str]), ``cap2img`` (int64
    ``[n_captions]``), ``image_ids`` (list[str] | None, one per unique image), ``n_regions`` (R),
    ``feat_dim`` (D), ``captions_per_image`` (k), ``repeated`` (rows repeat each image 5 times),
    ``path`` (the ims file).

    ``max_images`` keeps the first m images and their captions (F30K dev validation uses 1,000).
    ``repeated_images`` forces (True) or forbids (False) the repeated-rows layout; None detects it.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        max_images: int | None = None,
        check_finite: bool = True,
        repeated_images: bool | None = None,
    ) -> None:
        root = Path(root)
        self.root, self.split, self.check_finite = root, split, check_finite
        self.path = root / f"{split}_ims.npy"
        caps_path = root / f"{split}_caps.txt"
        ids_path = root / f"{split}_ids.txt"
        holds = f"a precomp folder holds {split}_ims.npy, {split}_caps.txt and optionally {split}_ids.txt"
        for p in (self.path, caps_path):
            require_file(p, f"a file ({holds})")

        shape, dtype, fortran, self._offset = read_npy_header(self.path)
        expect(dtype == np.float32, self.path, "dtype float32", dtype)
        expect(len(shape) == 3, self.path, "a 3-d array (images, regions, dim)", f"shape {shape}")
        expect(min(shape) > 0, self.path, "at least one row, region and feature", f"shape {shape}")
        expect(
            not fortran,
            self.path,
            "C (row-major) order (save np.ascontiguousarray of the features)",
            "Fortran order",
        )
        rows, self.n_regions, self.feat_dim = shape
        self._shape = shape
        self._row_bytes = self.n_regions * self.feat_dim * 4

        captions = read_lines(caps_path, "caption")
        n_caps = len(captions)
        caption_blocks(n_caps, rows, caps_path, "image")
        ids: list[str] | None = None
        if ids_path.is_file():
            ids = read_lines(ids_path, "id")
            expect(
                len(ids) == rows,
                ids_path,
                f"{rows} ids (one per row of {self.path.name})",
                len(ids),
            )

        self._fd: int | None = None  # the feature file, opened lazily per process
        self._fd_pid = -1
        self._scratch: np.ndarray | None = None  # see _row_buffer
        self._scratch_pid = -1
        if repeated_images is None:
            repeated = rows == n_caps and rows % REPEAT == 0 and self._looks_repeated(ids, rows)
        else:
            repeated = repeated_images
            if repeated:
                expect(
                    rows == n_caps and rows % REPEAT == 0,
                    caps_path,
                    f"one caption per row in groups of {REPEAT} for repeated_images=True "
                    f"({rows} rows)",
                    f"{n_caps} captions",
                )
        self.repeated = bool(repeated)
        self._stride = REPEAT if self.repeated else 1
        total = rows // self._stride
        k = REPEAT if self.repeated else n_caps // rows

        self._check_max_images(max_images)
        self.n_images = self._kept(total, max_images)
        self._set_caption_blocks(captions, self.n_images, k)
        self.image_ids = None if ids is None else ids[:: self._stride][: self.n_images]

    def _file(self) -> int:
        """The feature file's descriptor in this process, opened (and its header re-checked) on
        first use; a forked child opens its own."""
        if self._fd is None or self._fd_pid != os.getpid():
            shape, dtype, _, offset = read_npy_header(self.path)
            expect(
                shape == self._shape and dtype == np.float32 and offset == self._offset,
                self.path,
                f"float32 {self._shape} as when opened",
                f"{dtype} {shape}",
            )
            self._fd, self._fd_pid = (
                os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)),
                os.getpid(),
            )
        return self._fd

    def read_rows(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """File rows ``rows`` (any order, repeats allowed) as a new float32 array ``[n, R, D]``.

        Runs of consecutive rows are read with one positioned read each; nothing else is read.
        Bounds are the caller's (file rows, not images); finiteness is not checked here.
        """
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.n_regions, self.feat_dim), dtype=np.float32)
        if len(rows) == 0:
            return out
        fd, size = self._file(), self._row_bytes
        flat = out.reshape(-1).view(np.uint8)
        if len(rows) == 1:  # the per-item path: no run splitting
            pread_into(fd, flat, self._offset + int(rows[0]) * size, self.path)
            return out
        # split where the next row is not the following one: each piece is one contiguous read
        cuts = np.flatnonzero(np.diff(rows) != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
            pread_into(fd, flat[a * size : b * size], self._offset + int(rows[a]) * size, self.path)
        return out

    def _looks_repeated(self, ids: list[str] | None, rows: int) -> bool:
        """Rows == captions: are rows repeated in groups of 5? Ids decide; without them compare the
        features of the first and last group (10 rows read, not the file)."""
        if ids is not None:
            return is_repeated(ids)
        groups = [self.read_rows(range(g, g + REPEAT)) for g in (0, rows - REPEAT)]
        return all(np.array_equal(x[0], x[t]) for x in groups for t in range(1, REPEAT))

    def image(self, i: int, keep: np.ndarray | None = None) -> np.ndarray:
        """Features of unique image ``i``: a new float32 array ``[R, D]``, or only the regions
        ``keep`` selects (a bool mask ``[R]`` or indices) ``[M, D]``.

        The finiteness check covers the whole row, dropped regions too (as before dropping).
        """
        m = self.n_regions if keep is None else _n_kept(keep)
        out = np.empty((m, self.feat_dim), dtype=np.float32)
        self.image_into(i, out, keep)
        return out

    def image_into(self, i: int, out: np.ndarray, keep: np.ndarray | None = None) -> None:
        """Write :meth:`image` ``(i, keep)`` into ``out`` (C-contiguous float32 ``[M, D]``, e.g. a
        batch's slot): the whole row is read straight into ``out``, or, with ``keep``, into a
        reused per-process row buffer and the kept regions copied out (no new array either way).
        """
        row = self._item_index(i) * self._stride
        m = self.n_regions if keep is None else _n_kept(keep)
        if out.shape != (m, self.feat_dim) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(
                f"image_into: expected a C-contiguous float32 {(m, self.feat_dim)} array, found "
                f"{out.dtype} {out.shape}"
            )
        whole = out if keep is None else self._row_buffer()
        pread_into(
            self._file(), whole.reshape(-1).view(np.uint8), self._offset + row * self._row_bytes,
            self.path,
        )  # fmt: skip
        if self.check_finite:
            self._expect_finite(whole[None], row)
        if keep is not None:
            keep = np.asarray(keep)
            if keep.dtype == np.bool_:
                np.compress(keep, whole, axis=0, out=out)
            else:
                np.take(whole, keep, axis=0, out=out)

    def _row_buffer(self) -> np.ndarray:
        """A ``[R, D]`` float32 scratch row of this process (reused: no page faults per item)."""
        if self._scratch is None or self._scratch_pid != os.getpid():
            self._scratch = np.empty((self.n_regions, self.feat_dim), dtype=np.float32)
            self._scratch_pid = os.getpid()
        return self._scratch

    def deferred_image(self, i: int, keep: np.ndarray | None = None) -> RegionRead:
        """:meth:`image` ``(i, keep)`` as a :class:`RegionRead`: read when the batch is padded,
        straight into its slot (``gpo_lit.data.collate.pad_sets``)."""
        return RegionRead(self, self._item_index(i), keep)

    def _expect_finite(self, rows: np.ndarray, first_row: int) -> None:
        """One line naming the first row of ``rows`` (``[n, R, D]``, file rows ``first_row``,
        ``first_row + stride``, …) holding NaN/inf."""
        bad = count_nonfinite(rows)
        if bad is not None:
            k = int(np.argmax(bad > 0))
            row = first_row + k * self._stride
            raise GpoLitError(
                f"{self.path}: expected finite features in row {row}, found {int(bad[k])} "
                "NaN/inf values"
            )

    def feature_bytes(self) -> int:
        """Bytes of the rows this split reads (what :meth:`scan_finite` reads)."""
        return self.n_images * self.n_regions * self.feat_dim * 4

    def scan_finite(self, chunk_bytes: int = 64 << 20) -> None:
        """Check that the features of every image are finite, reading ``chunk_bytes`` at a time
        (about 6 GB/s from the page cache: the 300 MB of the F30K test split in 0.05 s)."""
        if not self.check_finite:
            return
        stride = self._stride
        per_chunk = max(1, chunk_bytes // self._row_bytes)
        for start in range(0, self.n_images, per_chunk):
            stop = min(self.n_images, start + per_chunk)
            chunk = self.read_rows(range(start * stride, stop * stride, stride))
            self._expect_finite(chunk, start * stride)

    def display_image(self, i: int) -> None:
        """No picture: precomputed region features only (figures show the image id instead)."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"], state["_fd_pid"] = None, -1  # each process opens the file itself
        state["_scratch"], state["_scratch_pid"] = None, -1
        return state

    def close(self) -> None:
        """Close this process's descriptor of the feature file (reopened on the next read)."""
        if self._fd is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd, self._fd_pid = None, -1

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            self.close()

    def __repr__(self) -> str:
        return (
            f"PrecompSplit({str(self.root)!r}, {self.split!r}: {self.n_images} images x "
            f"{self.captions_per_image} captions, {self.n_regions}x{self.feat_dim} regions"
            f"{', repeated rows' if self.repeated else ''})"
        )


def write_precomp_split(
    root: str | Path,
    split: str,
    ims: np.ndarray,
    captions: Sequence[str],
    ids: Sequence[str] | None = None,
) -> None:
    """Write split ``split`` under ``root`` in the precomp layout: ``ims`` float32 ``[N, R, D]``
    (C order), ``captions`` (k per image, in image order) and optionally one id per image; each
    file atomically (a reader never sees half of one)."""
    root = Path(root)
    expect(
        ims.dtype == np.float32 and ims.ndim == 3,
        f"{split} features",
        "float32 [images, regions, dim]",
        f"{ims.dtype} {ims.shape}",
    )
    write_atomic(root / f"{split}_ims.npy", lambda f: np.save(f, ims, allow_pickle=False))
    write_atomic(root / f"{split}_caps.txt", lines_bytes(captions))
    if ids is not None:
        write_atomic(root / f"{split}_ids.txt", lines_bytes(ids))


class RegionRead:
    """Image ``image``'s regions (those ``keep`` selects), not read yet: ``shape`` ``(M, D)``,
    ``dtype`` float32, and :meth:`read_into` writes them into a batch's ``[M, D]`` slot. Lets the
    collate assemble a batch with one copy out of the page cache and no per-item array."""

    __slots__ = ("image", "keep", "shape", "split")
    dtype = np.dtype(np.float32)

    def __init__(self, split: PrecompSplit, image: int, keep: np.ndarray | None) -> None:
        m = split.n_regions if keep is None else _n_kept(keep)
        self.split, self.image, self.keep, self.shape = split, image, keep, (m, split.feat_dim)

    def read_into(self, out: np.ndarray) -> None:
        self.split.image_into(self.image, out, self.keep)

    def numpy(self) -> np.ndarray:
        """The regions as a new array (what :meth:`PrecompSplit.image` returns)."""
        return self.split.image(self.image, self.keep)
