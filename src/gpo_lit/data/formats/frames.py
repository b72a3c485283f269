"""Reader of per-video ``.npy`` frame features (the CLIP-era layout), REFERENCE §7.

One ``.npy`` ``(T, D)`` per video in a folder, a caption JSON (``{video: [captions]}``, or
MSR-VTT's ``MSRVTT_data.json`` with a ``sentences`` list) and split lists as ``.txt`` (one video
id per line) or ``.csv`` (a ``video_id`` column; with a ``sentence`` column the CSV carries the
captions itself, e.g. the MSR-VTT 1k-A test set: one caption per test video). What every video
reader shares (and checks) is :class:`gpo_lit.data.formats.video.VideoSplit`'s.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from gpo_lit.data.formats.base import check_unique, load_json, read_lines
from gpo_lit.data.formats.npy import read_npy_header
from gpo_lit.data.formats.video import VideoSplit, caption_table
from gpo_lit.errors import GpoLitError, MissingFileError, expect, first_line, require_file


class FrameNpySplit(VideoSplit):
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
            names, pairs = (
                check_unique(read_lines(split_path, "video id"), split_path, "video"),
                None,
            )
        if pairs is None:
            caps_path = root / captions_file
            per_video = caption_table(
                load_json(caps_path, "captions {video_id: [captions]}"), caps_path
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
