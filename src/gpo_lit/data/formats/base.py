"""The interface every split reader offers, and the checks every reader shares (each once).

A reader (SCAN precomp regions, raw images, webdataset shards, HGR or per-video ``.npy`` frame
features) is a :class:`ReaderBase` subclass: it finds its files, then hands the shared parts here
— text lines and JSON loaded with one-line errors, ``max_images``, captions in blocks or lists
per item and the caption → item map they give, repeated ids, the index range of ``image(i)``,
finite features — so one kind of bad input gets one message whichever format holds it.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gpo_lit.errors import GpoLitError, MissingFileError, expect, first_line, require_file

_UTF8_BOM = b"\xef\xbb\xbf"


@runtime_checkable
class SplitReader(Protocol):
    """One split of a retrieval data set: items ("images": images or videos) and their captions.

    Readers validate their files on open (one-line :class:`gpo_lit.errors.GpoLitError`, a
    :class:`gpo_lit.errors.MissingFileError` for absent files), open large arrays lazily in each
    process, and are cheap to pickle.
    """

    path: Path  # the main feature file (named in errors)
    cap2img: np.ndarray  # int64 [n_captions]: caption → item index
    feat_dim: int
    captions: list[str]

    @property
    def n_images(self) -> int:
        """Number of items."""
        ...

    @property
    def n_captions(self) -> int:
        """Number of captions."""
        ...

    def image(self, i: int) -> np.ndarray:
        """Features of item ``i``: float32 ``[n, D]`` (regions, grid cells or frames)."""
        ...

    def caption(self, j: int) -> str:
        """Caption ``j``."""
        ...

    def display_image(self, i: int) -> Any:
        """What a figure shows for item ``i``: an RGB ``PIL.Image`` when the data are pictures,
        None when there are none to show (precomputed features, video frame features)."""
        ...


# ---- files ---------------------------------------------------------------------------------------
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


def lines_bytes(lines: Sequence[str]) -> bytes:
    """The bytes of a text file of ``lines`` as :func:`read_lines` reads it (UTF-8, one per line,
    a final newline): what the writers of captions, ids and split lists write."""
    return ("\n".join(lines) + "\n").encode()


def load_json(path: str | Path, what: str) -> Any:
    """The JSON document in ``path`` (UTF-8, a BOM allowed); ``what`` says what it should hold."""
    path = Path(path)
    require_file(path, what)
    try:
        return json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise GpoLitError(f"{path}: expected UTF-8 JSON ({what}), found {first_line(e)}") from None
    except json.JSONDecodeError as e:
        raise GpoLitError(
            f"{path}: expected JSON ({what}), found invalid JSON at line {e.lineno} column "
            f"{e.colno} ({e.msg})"
        ) from None


def check_unique(names: list[str], path: Path, what: str) -> list[str]:
    """``names`` (ids of a split list) unchanged, if each is non-empty and listed once."""
    seen: dict[str, int] = {}
    for k, n in enumerate(names):
        expect(n.strip() != "", path, f"non-empty {what} names", f"an empty name at position {k}")
        expect(
            n not in seen,
            path,
            f"each {what} listed once",
            f"{n!r} at positions {seen.get(n)} and {k}",
        )
        seen[n] = k
    return names


def count_nonfinite(rows: np.ndarray) -> np.ndarray | None:
    """None when every value of ``rows`` (``[n, ...]``) is finite, else the NaN/inf count per row
    ``[n]`` (int64). The common case costs one BLAS dot product: any NaN/inf makes it non-finite
    (so can squares over 1e38, which the exact count then clears)."""
    flat = rows.reshape(-1)
    if np.isfinite(np.dot(flat, flat)):
        return None
    bad = (~np.isfinite(rows)).reshape(len(rows), -1).sum(axis=1)
    return bad if bad.any() else None


# ---- the reader base -------------------------------------------------------------------------
class ReaderBase:
    """What every reader shares once its files are found: ``n_captions``, ``caption(j)``, the
    ``max_images`` check and cut, captions per item and ``cap2img``, the index range.

    Subclasses set ``path`` (named in errors), ``captions`` and ``cap2img`` (through
    :meth:`_set_caption_blocks` or :meth:`_set_caption_lists`) and ``n_images``.
    """

    captions: list[str]
    cap2img: np.ndarray
    captions_per_image: float  # k; shards: the mean, as the count may vary per item
    path: Path
    item = "image"  # what one item is called in messages ("video" for video readers)

    @property
    def n_captions(self) -> int:
        return len(self.captions)

    def caption(self, j: int) -> str:
        """Caption ``j``; it belongs to item ``cap2img[j]``."""
        j = operator.index(j)
        if not 0 <= j < self.n_captions:
            raise IndexError(
                f"caption {j} out of range for {self.n_captions} captions in {self.path}"
            )
        return self.captions[j]

    def _item_index(self, i: int) -> int:
        """``i`` as an int, if it names an item of the split (an IndexError otherwise)."""
        i = operator.index(i)
        n = self.n_images  # type: ignore[attr-defined]
        if not 0 <= i < n:
            raise IndexError(f"{self.item} {i} out of range for {n} {self.item}s in {self.path}")
        return i

    @classmethod
    def _check_max_images(cls, max_images: int | None) -> None:
        if max_images is not None:
            expect(max_images >= 1, "max_images", f"a positive number of {cls.item}s", max_images)

    @staticmethod
    def _kept(n_total: int, max_images: int | None) -> int:
        """How many items a split keeps: the first ``max_images`` of ``n_total``."""
        return n_total if max_images is None else min(max_images, n_total)

    def _set_caption_blocks(self, captions: list[str], n_items: int, k: int) -> None:
        """Captions in blocks of ``k`` per item (item i: lines k·i … k·i+k−1), the first
        ``n_items`` items kept; sets ``captions``, ``captions_per_image`` and ``cap2img``."""
        self.captions_per_image = k
        self.captions = captions[: n_items * k]
        self.cap2img = np.arange(len(self.captions), dtype=np.int64) // k

    def _set_caption_lists(self, per_item: Sequence[Sequence[str]]) -> None:
        """Captions given as one list per item (any lengths); sets ``captions`` and ``cap2img``."""
        self.captions = [c for caps in per_item for c in caps]
        self.cap2img = np.repeat(
            np.arange(len(per_item), dtype=np.int64), [len(c) for c in per_item]
        )


def caption_blocks(n_captions: int, n_items: int, path: Path, per: str) -> int:
    """``k``, the captions per item, if ``n_captions`` is a multiple of ``n_items`` (an error
    naming ``path`` otherwise; ``per`` says what one item is, e.g. "image", "id in ids.txt")."""
    expect(
        n_captions % n_items == 0,
        path,
        f"a multiple of {n_items} captions (one block per {per})",
        n_captions,
    )
    return n_captions // n_items


def open_split(
    reader: Callable[..., SplitReader],
    root: str | Path,
    name: str,
    max_images: int | None = None,
    source_hint: str = "",
) -> SplitReader:
    """Open and validate split ``name`` with ``reader``; a missing file also says where the data
    come from (``source_hint``)."""
    try:
        return reader(root=Path(root), split=name, max_images=max_images)
    except MissingFileError as err:
        if not source_hint:
            raise
        raise MissingFileError(f"{err}; {source_hint}") from None
