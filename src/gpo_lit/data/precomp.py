"""Reader for the SCAN "precomp" layout of precomputed region features (BUTD and friends).

A split ``<split>`` of a folder ``root`` is

- ``{split}_ims.npy``: float32 ``(N_rows, R, D)`` region features (e.g. 36 x 2048);
- ``{split}_caps.txt``: UTF-8, one caption per line, ``k`` per image (image i -> lines k*i .. k*i+k-1);
- ``{split}_ids.txt`` (optional): one image id per row of the features.

Old copies store every image ``k = 5`` times (one row per caption, ``N_rows == N_captions``); this is
detected from the ids file (ids repeated in consecutive groups of 5) or forced with
``repeated_images=True``, and then unique image i is row 5i and caption j belongs to image j // 5.

Everything cheap is validated on open (the ``.npy`` header, never the data); non-finite features
are checked per image on access. The feature file is memory-mapped lazily in each process and
never pickled: a pickled ``np.memmap`` carries the whole array, and DataLoader workers must map
the file themselves.
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.reader import CaptionList
from gpo_lit.errors import GpoLitError, expect, require_file

REPEAT = 5  # old copies store each image this many times, one row per caption
_UTF8_BOM = b"\xef\xbb\xbf"


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Return ``(shape, dtype, fortran_order, data_offset)`` of a ``.npy`` file from its header alone.

    Also checks that the file is long enough to hold the array it announces (a truncated download
    otherwise fails later inside ``np.load`` with a message that names no file).
    """
    path = Path(path)
    expect(path.is_file(), path, "a .npy file", "no such file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise GpoLitError(
                    f"{path}: expected a .npy file of format version 1.0 or 2.0, "
                    f"found version {version[0]}.{version[1]}"
                )
        except GpoLitError:
            raise
        except Exception as e:  # bad magic, short or unparsable header (ValueError, TokenError...)
            reason = (str(e).splitlines() or [""])[0] if isinstance(e, ValueError) else ""
            reason = reason or f"an unparsable header ({type(e).__name__})"
            raise GpoLitError(f"{path}: expected a .npy array file, found {reason}") from None
        offset = f.tell()
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(path) - offset
    expect(
        have >= n_bytes,
        path,
        f"{n_bytes} bytes of data for shape {tuple(shape)} {dtype}",
        f"{have} (truncated file?)",
    )
    return tuple(shape), dtype, fortran, offset


def read_lines(path: str | Path, what: str) -> list[str]:
    """Non-empty, stripped lines of a UTF-8 text file; an empty line is an error naming its number.

    One final newline is allowed; ``what`` names a line in messages ("caption", "id").
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw.startswith(_UTF8_BOM):
        raw = raw[len(_UTF8_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise GpoLitError(
            f"{path}: expected UTF-8 text, found byte {raw[e.start]:#04x} on line {line}"
        ) from None
    # split on "\n" only: str.splitlines() also breaks on \x0b, \x1c, U+2028 ... inside captions
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    expect(len(lines) > 0, path, f"one {what} per line", "an empty file")
    out = [ln.strip() for ln in lines]
    for i, ln in enumerate(out):
        expect(ln != "", path, f"one non-empty {what} per line", f"an empty line {i + 1}")
    return out


class PrecompSplit(CaptionList):
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

        shape, dtype, _, _ = read_npy_header(self.path)
        expect(dtype == np.float32, self.path, "dtype float32", dtype)
        expect(len(shape) == 3, self.path, "a 3-d array (images, regions, dim)", f"shape {shape}")
        expect(min(shape) > 0, self.path, "at least one row, region and feature", f"shape {shape}")
        rows, self.n_regions, self.feat_dim = shape
        self._shape = shape

        captions = read_lines(caps_path, "caption")
        n_caps = len(captions)
        expect(
            n_caps % rows == 0,
            caps_path,
            f"a multiple of {rows} captions (one block per image)",
            n_caps,
        )
        ids: list[str] | None = None
        if ids_path.is_file():
            ids = read_lines(ids_path, "id")
            expect(
                len(ids) == rows,
                ids_path,
                f"{rows} ids (one per row of {self.path.name})",
                len(ids),
            )

        self._mm: np.ndarray | None = None  # memory map, opened lazily per process
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

        if max_images is not None:
            expect(max_images >= 1, "max_images", "a positive number of images", max_images)
        self.n_images = total if max_images is None else min(max_images, total)
        self.captions_per_image = k
        self.captions: list[str] = captions[: self.n_images * k]
        self.cap2img = np.arange(len(self.captions), dtype=np.int64) // k
        self.image_ids = None if ids is None else ids[:: self._stride][: self.n_images]

    def _ims(self) -> np.ndarray:
        """The feature file as a read-only memory map ``(N_rows, R, D)``, opened on first use."""
        if self._mm is None:
            mm = np.load(self.path, mmap_mode="r", allow_pickle=False)
            expect(
                mm.shape == self._shape and mm.dtype == np.float32,
                self.path,
                f"float32 {self._shape} as when opened",
                f"{mm.dtype} {mm.shape}",
            )
            self._mm = mm
        return self._mm

    def _looks_repeated(self, ids: list[str] | None, rows: int) -> bool:
        """Rows == captions: are rows repeated in groups of 5? Ids decide; without them compare the
        features of the first and last group (10 rows read, not the file)."""
        if ids is not None:
            return all(ids[r] == ids[r - r % REPEAT] for r in range(rows))
        mm = self._ims()
        groups = (0, rows - REPEAT)
        return all(np.array_equal(mm[g], mm[g + t]) for g in groups for t in range(1, REPEAT))

    def image(self, i: int) -> np.ndarray:
        """Features of unique image ``i``: a float32 copy ``[R, D]``."""
        i = operator.index(i)
        if not 0 <= i < self.n_images:
            raise IndexError(f"image {i} out of range for {self.n_images} images in {self.path}")
        row = i * self._stride
        x = np.array(self._ims()[row], dtype=np.float32)  # copy out of the map
        if self.check_finite:
            bad = int(x.size - np.isfinite(x).sum())
            expect(bad == 0, self.path, f"finite features in row {row}", f"{bad} NaN/inf values")
        return x

    def display_image(self, i: int) -> None:
        """No picture: precomputed region features only (figures show the image id instead)."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_mm"] = None  # never pickle the map: it would carry the whole array
        return state

    def __repr__(self) -> str:
        return (
            f"PrecompSplit({str(self.root)!r}, {self.split!r}: {self.n_images} images x "
            f"{self.captions_per_image} captions, {self.n_regions}x{self.feat_dim} regions"
            f"{', repeated rows' if self.repeated else ''})"
        )
