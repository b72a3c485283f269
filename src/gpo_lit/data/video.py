"""Split readers for video-text retrieval: frame features per video plus captions (REFERENCE §7).

Here the "images" of :class:`gpo_lit.data.reader.SplitReader` are videos and ``image(i)`` returns
the frame features ``[T_i, D]`` of video ``i`` (float32; ``T_i`` varies). Two layouts:

- :class:`HGRSplit` — the HGR release used by the paper's video experiments (MSR-VTT ResNet-152,
  VATEX I3D): an HDF5 file ``{video_name: float (frames, D)}``, ``ref_captions.json``
  (``{video_name: [captions]}``) and split lists ``{trn,val,tst}_names.npy``.
- :class:`FrameNpySplit` — the CLIP-era layout: one ``.npy`` ``(T, D)`` per video in a folder, a
  caption JSON (``{video: [captions]}``, or MSR-VTT's ``MSRVTT_data.json`` with a ``sentences``
  list) and split lists as ``.txt`` (one video id per line) or ``.csv`` (a ``video_id`` column;
  with a ``sentence`` column the CSV carries the captions itself, e.g. the MSR-VTT 1k-A test set:
  one caption per test video).

Both readers

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

import csv
import json
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.precomp import read_lines, read_npy_header
from gpo_lit.data.reader import CaptionList
from gpo_lit.errors import GpoLitError, MissingFileError, expect, first_line, require_file

# HGR names its split files trn / val / tst; gpo_lit configs say train / val / test.
HGR_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "dev": "val", "test": "tst", "tst": "tst"}


def sample_frames(n_total: int, n_frames: int | None) -> np.ndarray:
    """Indices of the frames kept from a video of ``n_total`` frames: all of them when
    ``n_frames`` is None or ``n_total <= n_frames``, else ``n_frames`` evenly spaced indices
    ``round(linspace(0, n_total - 1, n_frames))`` (first and last frame included; HGR's ``select``).
    """
    if n_frames is None or n_total <= n_frames:
        return np.arange(n_total, dtype=np.int64)
    return np.round(np.linspace(0, n_total - 1, n_frames)).astype(np.int64)


def _load_json(path: Path, what: str) -> Any:
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


def _caption_table(data: Any, path: Path) -> dict[str, Any]:
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


class _VideoSplit(CaptionList):
    """What both readers share once their tables are built: sampling, checks and access.

    Subclasses set ``path``, ``video_ids``, ``n_total_frames`` (frames stored per video),
    ``feat_dim``, ``captions``, ``cap2img`` and implement ``_read(i)`` (all frames of video i).
    """

    path: Path
    video_ids: list[str]
    n_total_frames: np.ndarray  # int64 [n_images]: frames stored per video (before sampling)
    feat_dim: int
    captions: list[str]
    cap2img: np.ndarray

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

    @staticmethod
    def _check_max_images(max_images: int | None) -> None:
        if max_images is not None:
            expect(max_images >= 1, "max_images", "a positive number of videos", max_images)

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
        if max_images is not None:
            names = names[:max_images]
        captions: list[str] = []
        cap2img: list[int] = []
        for i, name in enumerate(names):
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
                captions.append(" ".join(c.split()))  # one line: no newlines inside a caption
                cap2img.append(i)
        self.captions = captions
        self.cap2img = np.asarray(cap2img, dtype=np.int64)
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
        i = operator.index(i)
        if not 0 <= i < self.n_images:
            raise IndexError(f"video {i} out of range for {self.n_images} videos in {self.path}")
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
            bad = int(x.size - np.isfinite(x).sum())
            expect(bad == 0, where, f"finite features for video {name!r}", f"{bad} NaN/inf values")
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


def _load_names(path: Path) -> list[str]:
    """HGR split list: a 1-d array of video names in a ``.npy`` file, loaded without pickle."""
    require_file(path, "a split list of video names (.npy)")
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "allow_pickle" in str(e) or "pickle" in str(e).lower():
            raise GpoLitError(
                f"{path}: expected a string array of video names loadable without pickle, found "
                f"an object array that needs pickle (never unpickled; re-save it with "
                f"np.save(path, np.asarray(names, dtype=str)))"
            ) from None
        raise GpoLitError(
            f"{path}: expected a .npy array of video names, found {first_line(e)}"
        ) from None
    except (OSError, EOFError) as e:
        raise GpoLitError(
            f"{path}: expected a .npy array of video names, found {first_line(e)}"
        ) from None
    expect(
        isinstance(arr, np.ndarray), path, "a .npy array (not an .npz archive)", type(arr).__name__
    )
    expect(arr.dtype.kind in "US", path, "a string array of video names", f"dtype {arr.dtype}")
    expect(
        arr.ndim == 1 and arr.size > 0, path, "a non-empty 1-d array of names", f"shape {arr.shape}"
    )
    if arr.dtype.kind == "S":
        try:
            names = [b.decode("utf-8") for b in arr.tolist()]
        except UnicodeDecodeError:
            raise GpoLitError(
                f"{path}: expected UTF-8 video names, found undecodable bytes"
            ) from None
    else:
        names = [str(s) for s in arr.tolist()]
    return _check_names(names, path)


def _check_names(names: list[str], path: Path) -> list[str]:
    seen: dict[str, int] = {}
    for k, n in enumerate(names):
        expect(n.strip() != "", path, "non-empty video names", f"an empty name at position {k}")
        expect(
            n not in seen,
            path,
            "each video listed once",
            f"{n!r} at positions {seen.get(n)} and {k}",
        )
        seen[n] = k
    return names


class HGRSplit(_VideoSplit):
    """One split of an HGR-format video data set (REFERENCE §7).

    Files (relative to ``root``; ``{split}`` becomes HGR's split name trn / val / tst):

    - ``feature_file``: HDF5 ``{video_name: float (frames, D)}`` (one file for all splits, or one
      per split with ``{split}`` in the name: the release has
      ``ordered_feature/SA/resnet152.pth/{split}_ft.hdf5``); a name containing ``/`` is looked
      up as written, then with ``/`` replaced by ``_`` (as HGR does);
    - ``captions_file``: ``{video_name: [captions]}`` (release: ``annotation/RET/ref_captions.json``);
    - ``names_file``: the split's video names, a string ``.npy`` (release:
      ``public_split/{split}_names.npy``); loaded with ``allow_pickle=False``.

    Args:
        split: train / val / test (or trn / val / tst, dev = val).
        max_images: keep the first m videos of the split list and their captions.
        n_frames: sample this many frames uniformly per video (HGR: 20); None keeps all.
        check_finite: check each video's features for NaN/inf on access.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        max_images: int | None = None,
        n_frames: int | None = None,
        feature_file: str = "features.h5",
        captions_file: str = "ref_captions.json",
        names_file: str = "{split}_names.npy",
        check_finite: bool = True,
    ) -> None:
        expect(split in HGR_SPLITS, "split", f"one of {sorted(HGR_SPLITS)}", repr(split))
        super().__init__(root, split, max_images, n_frames, check_finite)
        root = self.root
        hgr = HGR_SPLITS[split]
        self.path = root / feature_file.format(split=hgr)
        names_path = root / names_file.format(split=hgr)
        caps_path = root / captions_file.format(split=hgr)
        require_file(self.path, "an HDF5 file of frame features {video_name: (frames, dim)}")

        names = _load_names(names_path)
        per_video = _load_json(caps_path, "captions {video_name: [captions]}")
        per_video = _caption_table(per_video, caps_path)
        self.video_ids = self._set_captions(names, per_video, caps_path, max_images)

        import h5py

        self._file = None  # opened lazily per process
        self._pid: int | None = None
        try:
            f = h5py.File(self.path, "r")
        except OSError as e:
            raise GpoLitError(
                f"{self.path}: expected an HDF5 file, found {first_line(e)}"
            ) from None
        with f:
            keys, shapes, dtypes = [], [], []
            for name in self.video_ids:
                key = name if name in f else name.replace("/", "_")
                if key not in f:
                    missing = sum(
                        1 for n in self.video_ids if n not in f and n.replace("/", "_") not in f
                    )
                    raise GpoLitError(
                        f"{self.path}: expected features of every video listed in {names_path.name}, "
                        f"found no dataset for {name!r} ({missing} of {len(self.video_ids)} missing)"
                    )
                ds = f[key]
                expect(
                    isinstance(ds, h5py.Dataset),
                    self.path,
                    f"a dataset (frames, dim) for video {name!r}",
                    f"a {type(ds).__name__}",
                )
                keys.append(key)
                shapes.append(tuple(ds.shape))
                dtypes.append(ds.dtype)
        self._keys = keys
        self._check_shapes(shapes, dtypes, [self.path] * len(shapes))

    def _h5(self):
        """The HDF5 file, opened on first use in this process (reopened after a fork)."""
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def _read(self, i: int) -> tuple[np.ndarray, Any]:
        return np.asarray(self._h5()[self._keys[i]][()]), self.path

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None  # never pickle an HDF5 handle: each process opens its own
        state["_pid"] = None
        return state


class FrameNpySplit(_VideoSplit):
    """One split of a per-video ``.npy`` frame-feature folder (CLIP-era layout, REFERENCE §7).

    Files (relative to ``root``):

    - ``features_dir/<video_id>.npy``: float ``(T, D)`` frame features of one video;
    - ``captions_file``: ``{video_id: [captions]}`` or MSR-VTT's ``MSRVTT_data.json``;
    - the split list: ``split_files[split]`` if given, else ``splits_dir/{split}.txt`` or
      ``splits_dir/{split}.csv``. A ``.txt`` holds one video id per line; a ``.csv`` has a header
      with a ``video_id`` column; with a ``sentence`` column too, each row is one (video,
      caption) pair and the caption file is not used for this split (MSR-VTT 1k-A test:
      ``MSRVTT_JSFUSION_test.csv``, one caption per video).

    Args:
        split: the split name (file name stem).
        max_images: keep the first m videos (in split order) and their captions.
        n_frames: sample this many frames uniformly per video (CLIP-era: 12); None keeps all.
        split_files: ``{split: relative path}`` overriding the ``splits_dir`` convention.
        check_finite: check each video's features for NaN/inf on access.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        max_images: int | None = None,
        n_frames: int | None = None,
        features_dir: str = "features",
        captions_file: str = "captions.json",
        splits_dir: str = "splits",
        split_files: dict[str, str] | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__(root, split, max_images, n_frames, check_finite)
        root = self.root
        self.path = root / features_dir
        split_path = self._split_path(root, split, splits_dir, split_files)
        if not self.path.is_dir():
            found = "a file" if self.path.exists() else "no such folder"
            raise MissingFileError(
                f"{self.path}: expected a folder of per-video frame features <video_id>.npy, found {found}"
            )

        if split_path.suffix.lower() == ".csv":
            names, pairs = self._read_csv(split_path)
        else:
            names, pairs = _check_names(read_lines(split_path, "video id"), split_path), None
        if pairs is None:
            caps_path = root / captions_file
            per_video = _caption_table(
                _load_json(caps_path, "captions {video_id: [captions]}"), caps_path
            )
        else:
            caps_path, per_video = split_path, pairs
        self.video_ids = self._set_captions(names, per_video, caps_path, max_images)

        files = [self.path / f"{v}.npy" for v in self.video_ids]
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise MissingFileError(
                f"{missing[0]}: expected the frame features of every video listed in "
                f"{split_path.name}, found no such file ({len(missing)} of {len(files)} missing)"
            )
        shapes, dtypes = [], []
        for f in files:
            shape, dtype, _, _ = read_npy_header(f)
            shapes.append(shape)
            dtypes.append(dtype)
        self._files = files
        self._check_shapes(shapes, dtypes, files)

    @staticmethod
    def _split_path(root: Path, split: str, splits_dir: str, split_files: dict | None) -> Path:
        if split_files and split in split_files:
            path = root / split_files[split]
            require_file(path, f"the list of videos of split {split!r} (.txt or .csv)")
            return path
        txt, csv_ = root / splits_dir / f"{split}.txt", root / splits_dir / f"{split}.csv"
        if txt.is_file() and csv_.is_file():
            raise GpoLitError(
                f"{txt.parent}: expected one list for split {split!r}, found both "
                f"{txt.name} and {csv_.name}"
            )
        if csv_.is_file():
            return csv_
        require_file(txt, f"the list of videos of split {split!r} ({split}.txt or {split}.csv)")
        return txt

    @staticmethod
    def _read_csv(path: Path) -> tuple[list[str], dict[str, list[str]] | None]:
        """Video ids in first-appearance order, and per-video captions if there is a sentence column."""
        try:
            text = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise GpoLitError(f"{path}: expected UTF-8 CSV, found {first_line(e)}") from None
        rows = list(csv.reader(text.splitlines()))
        expect(len(rows) > 0, path, "a CSV with a header line", "an empty file")
        header = [h.strip() for h in rows[0]]
        expect("video_id" in header, path, "a header with a 'video_id' column", f"columns {header}")
        vcol = header.index("video_id")
        scol = header.index("sentence") if "sentence" in header else None
        body = rows[1:]
        expect(len(body) > 0, path, "at least one row after the header", "none")
        names: list[str] = []
        pairs: dict[str, list[str]] = {}
        for k, row in enumerate(body, start=2):
            expect(
                len(row) == len(header),
                path,
                f"{len(header)} fields per row",
                f"{len(row)} on line {k}",
            )
            vid = row[vcol].strip()
            expect(vid != "", path, "a video id in every row", f"an empty one on line {k}")
            if scol is None:
                expect(
                    vid not in pairs, path, "each video listed once", f"{vid!r} again on line {k}"
                )
                pairs[vid] = []
                names.append(vid)
                continue
            sentence = row[scol].strip()
            expect(sentence != "", path, "a sentence in every row", f"an empty one on line {k}")
            if vid not in pairs:
                pairs[vid] = []
                names.append(vid)
            pairs[vid].append(sentence)
        return names, (pairs if scol is not None else None)

    def _read(self, i: int) -> tuple[np.ndarray, Any]:
        path = self._files[i]
        try:
            return np.load(path, allow_pickle=False), path
        except (ValueError, OSError, EOFError) as e:
            raise GpoLitError(
                f"{path}: expected a .npy array of frame features, found {first_line(e)}"
            ) from None
