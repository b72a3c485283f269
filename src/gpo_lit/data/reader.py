"""The interface every split reader offers (precomp regions, video frame stores, …)."""

from __future__ import annotations

import operator
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from gpo_lit.errors import MissingFileError


@runtime_checkable
class SplitReader(Protocol):
    """One split of a retrieval data set: items ("images": images or videos) and their captions.

    Readers validate their files on open (one-line :class:`gpo_lit.errors.GpoLitError`, a
    :class:`gpo_lit.errors.MissingFileError` for absent files), open large arrays lazily in each
    process, and are cheap to pickle.
    """

    path: Path  # the main feature file (named in errors)
    n_images: int
    cap2img: np.ndarray  # int64 [n_captions]: caption → item index
    feat_dim: int
    captions: list[str]

    @property
    def n_captions(self) -> int:
        """Number of captions (read-only: :class:`CaptionList` derives it from ``captions``)."""
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


class CaptionList:
    """``n_captions`` and ``caption(j)`` for readers that hold ``captions`` and ``path``."""

    captions: list[str]
    path: Path

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
