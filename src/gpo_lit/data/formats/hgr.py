"""Reader of the HGR release's video features (MSR-VTT ResNet-152, VATEX I3D), REFERENCE §7.

An HDF5 file ``{video_name: float (frames, D)}``, ``ref_captions.json`` (``{video_name:
[captions]}``) and split lists ``{trn,val,tst}_names.npy``; what every video reader shares (and
checks) is :class:`gpo_lit.data.formats.video.VideoSplit`'s.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.formats.base import check_unique, load_json
from gpo_lit.data.formats.video import VideoSplit, caption_table
from gpo_lit.errors import GpoLitError, expect, first_line, require_file

# HGR names its split files trn / val / tst; gpo_lit configs say train / val / test.
HGR_SPLITS = {"train": "trn", "trn": "trn", "val": "val", "dev": "val", "test": "tst", "tst": "tst"}


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
    return check_unique(names, path, "video")


class HGRSplit(VideoSplit):
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
        per_video = load_json(caps_path, "captions {video_name: [captions]}")
        per_video = caption_table(per_video, caps_path)
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
