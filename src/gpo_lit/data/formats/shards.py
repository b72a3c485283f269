"""Web-scale image–caption shards: ``webdataset`` tar files (as img2dataset writes them).

A shard is an uncompressed tar whose members are grouped into samples by key (the member path up
to the first dot of its file name): ``<key>.jpg|jpeg|png|webp`` is the image and the captions come
from ``<key>.json`` ``"captions"`` (a list: several captions of one image, as evaluation splits
need), else ``<key>.txt`` (the whole text is one caption), else ``<key>.json`` ``"caption"``.
Other members (``.json`` metadata without captions aside) are ignored.

Why random access instead of webdataset's streaming ``IterableDataset``: splitting a stream by
shard across ranks and workers gives unequal sample counts per rank (DDP then hangs or drops
data), no per-epoch permutation of the samples themselves, and no exact mid-epoch resume. Here
the shards are indexed once on open (stdlib ``tarfile`` reads only the 512-byte headers, and the
captions and the first bytes of each image), after which the split is an ordinary map-style
reader: :class:`~gpo_lit.data.sampling.EpochShuffleSampler` deals one (seed, epoch) permutation
across ranks, the DataLoader hands whole batches to workers, and a resumed run skips exactly the
batches already trained on — the same guarantees as every other reader. Each worker opens the
tar files itself (lazily) and reads an image with one ``pread`` of its bytes.

Bad samples are found while indexing and left out, with one summary line per split: a sample
without an image or without a caption (or an empty one), unreadable caption JSON, or an image
whose header PIL does not recognise. An image whose header is fine but whose body is corrupt is
only found when decoded: an error naming shard and key, or with ``skip_bad=True`` the mean image
(warned and counted in ``n_bad``) — dropping it there would change the batch count of one rank.

The same reader serves ``make features`` (extract.py reads any reader with ``image(i)``): point
its data config at the shards (not wired there yet).
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gpo_lit.data.formats.images import IMAGENET_MEAN, IMAGENET_STD, ImageSplit
from gpo_lit.errors import GpoLitError, MissingFileError, expect
from gpo_lit.files import ensure_new

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
HEADER_BYTES = 4096  # enough for PIL to identify JPEG / PNG / WebP


def sample_key(member: str) -> tuple[str, str]:
    """``("dir/000123", "jpg")`` for ``"dir/000123.jpg"`` (webdataset's convention: the key ends
    at the first dot of the file name; the extension is the rest, lower-cased)."""
    head, _, name = member.rpartition("/")
    stem, dot, ext = name.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


@dataclass
class SkipCounts:
    """Samples left out while indexing, by reason."""

    no_image: int = 0
    no_caption: int = 0
    bad_json: int = 0
    bad_header: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str, where: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        if len(self.examples) < 3:
            self.examples.append(f"{where} ({reason})")

    @property
    def total(self) -> int:
        return self.no_image + self.no_caption + self.bad_json + self.bad_header


def _captions_of(members: dict[str, bytes], where: str, skips: SkipCounts) -> list[str] | None:
    """The captions of one sample from its ``json`` / ``txt`` members, or None (counted)."""
    meta = None
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            skips.add("bad_json", where)
            return None
    caps: list[str] | None = None
    if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
        # a non-string entry (null, a number) is no caption: never its str()
        caps = [c.strip() if isinstance(c, str) else "" for c in meta["captions"]]
    elif "txt" in members:
        caps = [members["txt"].decode("utf-8", errors="replace").strip()]
    elif isinstance(meta, dict) and isinstance(meta.get("caption"), str):
        caps = [meta["caption"].strip()]
    if not caps or not all(caps):
        skips.add("no_caption", where)
        return None
    return caps


class ShardSplit(ImageSplit):
    """One split stored as webdataset tar shards: ``root/{split}-*.tar`` by default.

    Attributes as :class:`~gpo_lit.data.formats.images.ImageSplit` (``n_images``, ``n_captions``,
    ``captions``, ``cap2img``, ``image_ids`` (sample keys), ``feat_dim``, ``path``, ``n_bad``),
    plus ``shards`` (the tar files), ``skipped`` (:class:`SkipCounts`). ``image(i)`` and
    ``train_image(i, rng)`` are ImageSplit's (same evaluation resize and training crop / flip).

    Args:
        root: folder of the shards (a relative ``pattern`` is taken under it).
        split: split name, substituted for ``{split}`` in ``pattern``.
        pattern: glob of the split's shards (sorted by name); ``{split}`` is replaced.
        max_images: keep the first m samples (in shard order) and their captions.
        check_headers: identify each image's format from its first bytes while indexing (bad
            ones are skipped and counted); False skips that read.
        Other args: as :class:`~gpo_lit.data.formats.images.ImageSplit`.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        pattern: str = "{split}-*.tar",
        max_images: int | None = None,
        image_size: int = 512,
        crop_min_ratio: float = 0.6,
        hflip_p: float = 0.5,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        bgr: bool = False,
        scale: float = 1.0,
        check_headers: bool = True,
        skip_bad: bool = False,
        interpolation: str = "bilinear",
    ) -> None:
        # ImageSplit.__init__ reads the folder layout; only its pixel settings are shared here.
        root = Path(root)
        self.root, self.split = root, split
        self._pixel_settings(
            image_size, crop_min_ratio, hflip_p, mean, std, bgr, scale, skip_bad, interpolation
        )
        self._check_max_images(max_images)

        glob_path = Path(pattern.replace("{split}", split))
        if not glob_path.is_absolute():
            glob_path = root / glob_path
        self.path = glob_path  # named in errors and summaries
        self.shards = [Path(p) for p in sorted(glob.glob(str(glob_path)))]
        self.shards = [p for p in self.shards if p.is_file()]
        if not self.shards:
            found = "a folder" if glob_path.is_dir() else "no matching file"
            raise MissingFileError(
                f"{glob_path}: expected webdataset tar shards of the {split} split "
                f"(<key>.jpg|png|webp + <key>.txt|json per sample), found {found}"
            )

        self.skipped = SkipCounts()
        # per image: (shard number, byte offset, size) and its captions
        where: list[tuple[int, int, int]] = []
        keys: list[str] = []
        captions: list[list[str]] = []
        first_shard: dict[str, int] = {}  # key → the shard it came from
        for s, shard in enumerate(self.shards):
            if max_images is not None and len(keys) >= max_images:
                break  # the rest is not indexed
            for key, (off, size), caps in self._index(shard, check_headers):
                if max_images is not None and len(keys) >= max_images:
                    break
                # The same key twice (a shard copied under another name, a tar appended to
                # itself) would make one image two candidates of every query.
                seen = first_shard.setdefault(key, s)
                expect(
                    seen == s,
                    shard,
                    "sample keys unique across the split's shards",
                    f"key {key!r} again (first in {self.shards[seen]})",
                )
                captions.append(caps)
                keys.append(key)
                where.append((s, off, size))
        expect(
            bool(keys),
            glob_path,
            "at least one sample with an image and a caption",
            f"none in {len(self.shards)} shards ({self._skip_text()})",
        )
        self.image_ids = keys
        self.n_images = len(keys)
        self._set_caption_lists(captions)
        self._where = np.asarray(where, dtype=np.int64).reshape(-1, 3)
        self.captions_per_image = self.n_captions / len(keys)
        self.image_dir = glob_path.parent
        self.files = [f"{self.shards[s]}:{k}" for (s, _, _), k in zip(where, keys, strict=True)]
        self._handles: dict[int, int] = {}  # shard number → descriptor, per process
        self._pid = os.getpid()
        summary = (
            f"{split} shards {glob_path}: {self.n_images} samples, {self.n_captions} captions in "
            f"{len(self.shards)} shards; skipped {self._skip_text()}"
        )
        (log.warning if self.skipped.total else log.info)(summary)

    def _skip_text(self) -> str:
        k = self.skipped
        text = (
            f"{k.total} bad samples ({k.no_image} without an image, {k.no_caption} without a "
            f"caption, {k.bad_json} unreadable JSON, {k.bad_header} unrecognised image)"
        )
        return text + (f", e.g. {'; '.join(k.examples)}" if k.examples else "")

    def _index(
        self, shard: Path, check_headers: bool
    ) -> Iterable[tuple[str, tuple[int, int], list[str]]]:
        """(key, (image offset, image size), captions) of each good sample of ``shard``."""
        try:
            with tarfile.open(shard, mode="r:") as tar:  # uncompressed only: read by offset
                members = tar.getmembers()
        except (tarfile.TarError, OSError, EOFError) as e:
            raise GpoLitError(
                f"{shard}: expected an uncompressed tar shard, found {type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'unreadable'}"
            ) from None
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        for m in members:
            if m.isfile():
                key, ext = sample_key(m.name)
                groups.setdefault(key, {})[ext] = m
        with open(shard, "rb") as f:
            for key, parts in groups.items():
                here = f"{shard.name}:{key}"
                image = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                text = {e: parts[e] for e in ("txt", "json") if e in parts}
                if image is None:
                    if text:  # metadata-only keys (e.g. a failed download) count as bad
                        self.skipped.add("no_image", here)
                    continue
                small: dict[str, bytes] = {}
                for part, m in text.items():
                    f.seek(m.offset_data)
                    small[part] = f.read(m.size)
                caps = _captions_of(small, here, self.skipped)
                if caps is None:
                    continue
                if check_headers and not self._header_ok(f, image):
                    self.skipped.add("bad_header", here)
                    continue
                yield key, (image.offset_data, image.size), caps

    @staticmethod
    def _header_ok(f, member: tarfile.TarInfo) -> bool:
        from PIL import Image, UnidentifiedImageError

        f.seek(member.offset_data)
        head = f.read(min(member.size, HEADER_BYTES))
        try:
            with Image.open(io.BytesIO(head)) as im:
                return im.width > 0 and im.height > 0
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
            return False

    # -- pixels ----------------------------------------------------------------------------
    def image_bytes(self, i: int) -> bytes:
        """The encoded bytes of image ``i`` (one ``pread`` in this process's open shard)."""
        i = self._item_index(i)
        s, off, size = (int(v) for v in self._where[i])
        if self._pid != os.getpid():  # a forked worker: its own descriptors
            self._handles, self._pid = {}, os.getpid()
        fd = self._handles.get(s)
        if fd is None:  # opened lazily in each process, never pickled
            fd = self._handles[s] = os.open(self.shards[s], os.O_RDONLY)
        data = os.pread(fd, size, off)  # no shared file offset between threads or processes
        expect(len(data) == size, self.files[i], f"{size} image bytes", f"{len(data)} (truncated)")
        return data

    def _open(self, i: int):
        from PIL import Image, UnidentifiedImageError

        data = self.image_bytes(i)
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if not self.skip_bad:
                raise GpoLitError(
                    f"{self.files[i]}: expected a readable image, found {reason} "
                    "(data.reader.skip_bad=true replaces bad images by the mean image)"
                ) from None
            self.n_bad += 1
            log.warning(
                "%s: unreadable image (%s) replaced by the mean image", self.files[i], reason
            )
            return None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._handles.values():
                os.close(fd)

    def __repr__(self) -> str:
        return (
            f"ShardSplit({str(self.path)!r}: {self.n_images} images, {self.n_captions} captions "
            f"in {len(self.shards)} shards, {self.image_size}px)"
        )


def write_shards(
    samples: Iterable[tuple[str, bytes, str, Sequence[str]]],
    pattern: str | Path,
    samples_per_shard: int,
    *,
    replace: bool = False,
) -> list[Path]:
    """Pack samples ``(key, image bytes, image extension, captions)`` into tar shards
    ``pattern % shard_number`` (e.g. ``"out/train-%06d.tar"``), ``samples_per_shard`` each.

    Each sample becomes ``<key>.<ext>`` plus ``<key>.txt`` (the first caption) and ``<key>.json``
    (``{"key", "captions"}``). Every shard is written to a temporary name and renamed when
    complete; an existing shard is never overwritten (an error names it) unless ``replace``
    (the demo generator rewrites the shards its meta file claims: the same bytes, atomically).
    """
    import tempfile
    import time

    expect(samples_per_shard >= 1, "samples_per_shard", "a positive number", samples_per_shard)
    written: list[Path] = []
    tar = tmp = None

    def finish() -> None:
        assert tar is not None and tmp is not None
        tar.close()
        target = written[-1]
        if replace:
            os.replace(tmp, target)
            return
        try:
            os.link(tmp, target)  # fails if the target appeared meanwhile: never clobbered
        finally:
            os.unlink(tmp)

    mtime = time.time()
    for n, (key, data, ext, caps) in enumerate(samples):
        if n % samples_per_shard == 0:
            if tar is not None:
                finish()
            target = Path(str(pattern) % len(written))
            if not replace:
                ensure_new(target, "write the shards elsewhere")
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            os.close(fd)
            # closed by finish() once the shard is full
            tar = tarfile.open(tmp, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
            written.append(target)
        assert tar is not None  # opened at n == 0
        text = json.dumps({"key": key, "captions": list(caps)}).encode()
        for name, payload in ((f"{key}.{ext}", data), (f"{key}.txt", caps[0].encode()),
                              (f"{key}.json", text)):  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(payload), mtime, 0o644
            tar.addfile(info, io.BytesIO(payload))
    if tar is not None:
        finish()
    return written
