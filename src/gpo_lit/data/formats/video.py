"""What the video-text readers share: frame features per video plus captions (REFERENCE §7).

Here the "images" of :class:`gpo_lit.data.formats.base.SplitReader` are videos and ``image(i)``
returns the frame features ``[T_i, D]`` of video ``i`` (float32; ``T_i`` varies). Two layouts:

- :class:`~gpo_lit.data.formats.hgr.HGRSplit` — the HGR release used by the paper's video experiments (MSR-VTT ResNet-152,
  VATEX I3D): an HDF5 file ``{video_name: float (frames, D)}``, ``ref_captions.json``
  (``{video_name: [captions]}``) and split lists ``{trn,val,tst}_names.npy``.
- :class:`~gpo_lit.data.formats.frames.FrameNpySplit` — the CLIP-era layout: one ``.npy`` ``(T, D)`` per video in a folder, a
  caption JSON (``{video: [captions]}``, or MSR-VTT's ``MSRVTT_data.json`` with a ``sentences``
  list) and split lists as ``.txt`` (one video id per line) or ``.csv`` (a ``video_id`` column;
  with a ``sentence`` column the CSV carries the captions itself, e.g. the MSR-VTT 1k-A test set:
  one caption per test video).

Both readers (through :class:`VideoSplit`)

- validate everything cheap on open (names, captions, every video's shape from the file metadata,
  never the data) and raise one-line :class:`GpoLitError` messages naming the file, what was
  expected and what was found (:class:`MissingFileError` for absent files): a video listed in the
  split but absent from the features, zero frames, a frame width differing from the first video's,
  a listed video without captions or with an empty caption list, an empty caption;
- ignore captions of videos outside the split;
- keep the split list's video order; captions follow their video's order (``cap2img`` int64);
- optionally sample ``n_frames`` frames uniformly (:func:`sample_frames`: deterministic, evenly
  spaced, as HGR's ``select`` trimming; videos with fewer frames keep all of them);
- open data files lazily in each process (an HDF5 handle is never pickled and is reopened after a
  ``fork``), so they are cheap to send to DataLoader workers;
- return float32 whatever float type is stored (CLIP features often come as float16).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.formats.base import ReaderBase, count_nonfinite
from gpo_lit.errors import expect


def sample_frames(n_total: int, n_frames: int | None) -> np.ndarray:
    """Indices of the frames kept from a video of ``n_total`` frames: all of them when
    ``n_frames`` is None or ``n_total <= n_frames``, else ``n_frames`` evenly spaced indices
    ``round(linspace(0, n_total - 1, n_frames))`` (first and last frame included; HGR's ``select``).
    """
    if n_frames is None or n_total <= n_frames:
        return np.arange(n_total, dtype=np.int64)
    return np.round(np.linspace(0, n_total - 1, n_frames)).astype(np.int64)


def caption_table(data: Any, path: Path) -> dict[str, Any]:
    """``{video: [captions]}`` from a caption JSON; MSR-VTT's ``MSRVTT_data.json`` (a
    ``sentences`` list of ``{video_id, caption}``) is converted. Entries are checked on use."""
    if isinstance(data, dict) and isinstance(data.get("sentences"), list):
        table: dict[str, list[Any]] = {}
        for k, s in enumerate(data["sentences"]):
            ok = isinstance(s, dict) and isinstance(s.get("video_id"), str) and "caption" in s
            expect(
                ok,
                path,
                "sentences entries {'video_id': str, 'caption': str}",
                f"entry {k}: {s!r:.80}",
            )
            table.setdefault(s["video_id"], []).append(s["caption"])
        return table
    expect(
        isinstance(data, dict),
        path,
        "a JSON object {video: [captions]} (or MSR-VTT's {'sentences': [...]})",
        f"a JSON {type(data).__name__}",
    )
    return data


class VideoSplit(ReaderBase):
    """What both video readers share once their tables are built: sampling, checks and access.

    Subclasses set ``path``, ``video_ids``, ``n_total_frames`` (frames stored per video),
    ``feat_dim``, ``captions``, ``cap2img`` and implement ``_read(i)`` (all frames of video i).
    """

    path: Path
    video_ids: list[str]
    n_total_frames: np.ndarray  # int64 [n_images]: frames stored per video (before sampling)
    feat_dim: int
    captions: list[str]
    cap2img: np.ndarray
    item = "video"

    def __init__(
        self,
        root: str | Path,
        split: str,
        max_images: int | None,
        n_frames: int | None,
        check_finite: bool,
    ) -> None:
        self._check_max_images(max_images)
        self.root, self.split = Path(root), split
        if n_frames is not None:
            ok = isinstance(n_frames, int | np.integer) and not isinstance(n_frames, bool)
            expect(
                ok and n_frames >= 1, "n_frames", "a positive number of frames or null", n_frames
            )
            n_frames = int(n_frames)
        self.n_frames = n_frames
        self.check_finite = check_finite

    @property
    def n_images(self) -> int:
        return len(self.video_ids)

    @property
    def lengths(self) -> np.ndarray:
        """Frames ``image(i)`` returns per video (after sampling): int64 ``[n_images]``."""
        if self.n_frames is None:
            return self.n_total_frames.copy()
        return np.minimum(self.n_total_frames, self.n_frames)

    def _set_captions(
        self,
        names: list[str],
        per_video: dict[str, list[str]],
        caps_path: Path,
        max_images: int | None,
    ) -> list[str]:
        """Keep the first ``max_images`` videos; build ``captions`` / ``cap2img`` in video order
        from ``per_video`` (validated: a non-empty list of non-empty strings per listed video).
        Returns the kept names."""
        names = names[: self._kept(len(names), max_images)]
        kept: list[list[str]] = []
        for name in names:
            expect(
                name in per_video, caps_path, f"captions for video {name!r} (in the split)", "none"
            )
            caps = per_video[name]
            expect(
                isinstance(caps, list),
                caps_path,
                f"a list of captions for video {name!r}",
                f"a {type(caps).__name__}",
            )
            expect(
                len(caps) > 0,
                caps_path,
                f"at least one caption for video {name!r}",
                "an empty list",
            )
            for k, c in enumerate(caps):
                expect(
                    isinstance(c, str) and c.strip() != "",
                    caps_path,
                    f"non-empty caption strings for video {name!r}",
                    f"{c!r:.60} at position {k}",
                )
            kept.append([" ".join(c.split()) for c in caps])  # one line: no newlines inside
        self._set_caption_lists(kept)
        return names

    def _check_shapes(
        self, shapes: list[tuple[int, ...]], dtypes: list[np.dtype], where: list[Any]
    ) -> None:
        """Every video: a 2-d float array with >= 1 frame and the first video's width."""
        dims = None
        for name, shape, dtype, w in zip(self.video_ids, shapes, dtypes, where, strict=True):
            expect(
                len(shape) == 2,
                w,
                f"frame features (frames, dim) for video {name!r}",
                f"shape {tuple(shape)}",
            )
            expect(
                np.dtype(dtype).kind == "f",
                w,
                f"float frame features for video {name!r}",
                f"dtype {dtype}",
            )
            expect(shape[0] > 0, w, f"at least one frame for video {name!r}", "0 frames")
            if dims is None:
                dims = (shape[1], name)
            expect(
                shape[1] == dims[0],
                w,
                f"frame width {dims[0]} (as video {dims[1]!r}) for video {name!r}",
                shape[1],
            )
            expect(shape[1] > 0, w, f"a positive frame width for video {name!r}", 0)
        self.feat_dim = int(dims[0]) if dims is not None else 0
        self.n_total_frames = np.asarray([s[0] for s in shapes], dtype=np.int64)

    def _read(self, i: int) -> tuple[np.ndarray, Any]:  # pragma: no cover - interface
        """All frames of video ``i`` and where they come from (for messages)."""
        raise NotImplementedError

    def image(self, i: int) -> np.ndarray:
        """Frame features of video ``i``: a float32 ``[T_i, D]`` copy, sampled to ``n_frames``."""
        i = self._item_index(i)
        x, where = self._read(i)
        name = self.video_ids[i]
        expect(
            x.shape == (int(self.n_total_frames[i]), self.feat_dim),
            where,
            f"shape {(int(self.n_total_frames[i]), self.feat_dim)} for video {name!r} as when opened",
            f"{x.shape}",
        )
        x = np.ascontiguousarray(x[sample_frames(x.shape[0], self.n_frames)], dtype=np.float32)
        if self.check_finite:
            bad = count_nonfinite(x[None])
            n_bad = 0 if bad is None else int(bad[0])
            expect(
                n_bad == 0, where, f"finite features for video {name!r}", f"{n_bad} NaN/inf values"
            )
        return x

    def display_image(self, i: int) -> None:
        """No picture: the frames are feature vectors, not images (figures show the video id)."""
        return None

    def __repr__(self) -> str:
        t = self.lengths
        return (
            f"{type(self).__name__}({str(self.path)!r}: {self.n_images} videos, "
            f"{self.n_captions} captions, {t.min() if t.size else 0}-{t.max() if t.size else 0} "
            f"frames x {self.feat_dim})"
        )
