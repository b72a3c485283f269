"""Reader for raw images (end-to-end grid models), REFERENCE §4 and §7.

Layout of a data root (the VSE∞ release):

- ``root/precomp/{split}_ids.txt``: one image id per image (old copies: one per caption, in
  groups of 5);
- ``root/precomp/{split}_caps.txt``: k captions per image (image i → lines k·i … k·i+k−1);
- ``root/id_mapping.json``: ``{str(id): relative image file}``;
- the image files under ``root/images/`` (``image_dir``); when the mapped names live one folder
  deeper (``images/flickr30k-images/…``, ``images/train2014/…``) that folder is found on open.

``image(i)`` returns the evaluation view (the whole image resized to ``image_size`` squared),
``train_image(i, rng)`` the training view (random square-ratio crop r ~ U(0.6, 1) of height and
width at a random position, resized ignoring aspect ratio, horizontal flip p = 0.5). Both are
float32 ``[3, S, S]`` arrays normalised by ``mean``/``std`` (ImageNet by default; ``bgr=True``
with ``scale=255`` and Caffe means for the BUTD detector backbone).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from gpo_lit.data.formats.base import ReaderBase, caption_blocks, load_json, read_lines
from gpo_lit.data.formats.precomp import REPEAT, is_repeated
from gpo_lit.errors import GpoLitError, expect, not_a_file, require_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # BUTD detector (pixels 0..255, BGR, std 1)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")  # PIL's filters


def train_crop_box(
    width: int, height: int, rng: np.random.Generator, min_ratio: float = 0.6
) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop keeping a fraction r ~ U(min_ratio, 1) of both
    the width and the height, at a uniformly random position."""
    r = rng.uniform(min_ratio, 1.0)
    cw, ch = max(1, round(width * r)), max(1, round(height * r))
    x0 = int(rng.integers(0, width - cw + 1))
    y0 = int(rng.integers(0, height - ch + 1))
    return x0, y0, x0 + cw, y0 + ch


class ImageSplit(ReaderBase):
    """One split of a raw-image data set: file paths, captions and the caption → image map.

    Attributes as the other readers: ``n_images``, ``n_captions``, ``captions``, ``cap2img``,
    ``image_ids``, ``files`` (absolute paths), ``feat_dim`` (3 channels), ``path`` (the ids file),
    ``n_bad`` (images replaced so far in this process, with ``skip_bad``).

    Args:
        root: data root (``precomp/``, ``id_mapping.json``, ``images/``).
        split: split name (``train``, ``dev``, ``test``, ``testall``).
        max_images: keep the first m images and their captions.
        image_size: output side S (512 in the paper).
        crop_min_ratio: lower end of the training crop ratio.
        hflip_p: training horizontal flip probability.
        mean, std: per-channel normalisation after ``scale`` (in output channel order).
        bgr: output channels in BGR order (Caffe-converted backbones).
        interpolation: resampling filter of the resize (``bilinear`` as the released code;
            ``bicubic`` for most timm ViTs; ``data/transforms=backbone`` picks the backbone's).
        scale: pixel values are ``uint8 / 255 * scale`` before normalising (255 for Caffe).
        image_dir: folder of the image files, relative to ``root`` (or absolute).
        precomp_dir: folder of the ids / captions files, relative to ``root``.
        mapping_file: the id → file mapping, relative to ``root``.
        check_files: check on open that every mapped image file exists.
        skip_bad: a missing or unreadable image becomes the mean image (zeros after
            normalisation), with a warning, instead of an error.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        *,
        max_images: int | None = None,
        image_size: int = 512,
        crop_min_ratio: float = 0.6,
        hflip_p: float = 0.5,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        bgr: bool = False,
        scale: float = 1.0,
        interpolation: str = "bilinear",
        image_dir: str = "images",
        precomp_dir: str = "precomp",
        mapping_file: str = "id_mapping.json",
        check_files: bool = True,
        skip_bad: bool = False,
    ) -> None:
        root = Path(root)
        self.root, self.split = root, split
        self._pixel_settings(
            image_size, crop_min_ratio, hflip_p, mean, std, bgr, scale, skip_bad, interpolation
        )

        pre = root / precomp_dir
        self.path = ids_path = pre / f"{split}_ids.txt"
        caps_path = pre / f"{split}_caps.txt"
        map_path = root / mapping_file
        holds = (
            f"a raw-image data root holds {precomp_dir}/{split}_ids.txt, "
            f"{precomp_dir}/{split}_caps.txt, {mapping_file} and {image_dir}/"
        )
        for p in (ids_path, caps_path, map_path):
            require_file(p, f"a file ({holds})")

        ids = read_lines(ids_path, "id")
        captions = read_lines(caps_path, "caption")
        # old layout: one id per caption, each image repeated in groups of 5
        if len(ids) == len(captions) and is_repeated(ids):
            ids = ids[::REPEAT]
        k = caption_blocks(len(captions), len(ids), caps_path, f"id in {ids_path.name}")

        mapping = load_json(map_path, "a JSON object {id: file}")
        expect(
            isinstance(mapping, dict), map_path, "a JSON object {id: file}", type(mapping).__name__
        )
        missing = [i for i in ids if i not in mapping]
        expect(
            not missing,
            map_path,
            f"an entry for every id of {ids_path.name}",
            f"{len(missing)} ids without one (e.g. {missing[:1]})",
        )

        self._check_max_images(max_images)
        self.n_images = self._kept(len(ids), max_images)
        self.image_ids = ids[: self.n_images]
        self._set_caption_blocks(captions, self.n_images, k)

        rel = [str(mapping[i]) for i in self.image_ids]
        base = self._find_base(root / image_dir, rel[0])
        self.image_dir = base
        self.files = [str(base / r) for r in rel]
        if check_files:
            absent = [f for f in self.files if not os.path.isfile(f)]
            if absent and not skip_bad:
                raise GpoLitError(
                    f"{absent[0]}: expected an image file (id_mapping.json entry under {base}), "
                    f"found {not_a_file(absent[0])} ({len(absent)} of {self.n_images} {split} "
                    "images missing)"
                )
            if absent:
                log.warning(
                    "%d of %d %s images missing (skip_bad)", len(absent), self.n_images, split
                )

    @staticmethod
    def _find_base(image_dir: Path, first: str) -> Path:
        """``image_dir`` or its sub-folder holding the first mapped file."""
        if (image_dir / first).is_file() or not image_dir.is_dir():
            return image_dir
        for sub in sorted(p for p in image_dir.iterdir() if p.is_dir()):
            if (sub / first).is_file():
                return sub
        return image_dir

    # -- pixels ----------------------------------------------------------------------------
    def _open(self, i: int):
        from PIL import Image, UnidentifiedImageError

        i = self._item_index(i)
        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                return im.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
            reason = not_a_file(path) or type(e).__name__
            if isinstance(e, Image.DecompressionBombError):  # its size and PIL's limit
                reason = f"{type(e).__name__}: {str(e).splitlines()[0]}"
            if not self.skip_bad:
                raise GpoLitError(
                    f"{path}: expected a readable image (id {self.image_ids[i]}), found {reason} "
                    f"(data.reader.skip_bad=true replaces bad images by the mean image)"
                ) from None
            self.n_bad += 1
            log.warning("%s: unreadable image (%s) replaced by the mean image", path, reason)
            return None

    def _to_array(self, im) -> np.ndarray:
        s = self.image_size
        if im is None:
            return np.zeros((3, s, s), np.float32)
        x = np.asarray(im, dtype=np.float32).transpose(2, 0, 1)  # [3, S, S] RGB
        if self.bgr:
            x = x[::-1]
        x = x * (self.scale / 255.0)
        return np.ascontiguousarray((x - self.mean) / self.std, dtype=np.float32)

    def _pixel_settings(
        self,
        image_size: int,
        crop_min_ratio: float,
        hflip_p: float,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        bgr: bool,
        scale: float,
        skip_bad: bool,
        interpolation: str,
    ) -> None:
        """The image size, crop / flip, normalisation and resampling settings (checked), shared
        by every reader of raw pictures."""
        expect(int(image_size) >= 8, "image_size", "at least 8 pixels", image_size)
        expect(0 < crop_min_ratio <= 1, "crop_min_ratio", "a ratio in (0, 1]", crop_min_ratio)
        self.image_size = int(image_size)
        self.crop_min_ratio = float(crop_min_ratio)
        self.hflip_p = float(hflip_p)
        self.mean = np.asarray(mean, np.float32).reshape(3, 1, 1)
        self.std = np.asarray(std, np.float32).reshape(3, 1, 1)
        self.bgr, self.scale, self.skip_bad = bool(bgr), float(scale), bool(skip_bad)
        expect(
            str(interpolation) in INTERPOLATIONS,
            "data.reader.interpolation",
            f"one of {', '.join(INTERPOLATIONS)}",
            interpolation,
        )
        self.interpolation = str(interpolation)
        self.n_bad = 0
        self.feat_dim = 3

    def _filter(self):
        from PIL import Image

        return Image.Resampling[self.interpolation.upper()]

    def display_image(self, i: int):
        """Image ``i`` as the file holds it (RGB ``PIL.Image``), for figures; None if unreadable
        with ``skip_bad``."""
        return self._open(i)

    def image(self, i: int) -> np.ndarray:
        """Evaluation view of image ``i``: the whole image resized to S×S, float32 ``[3, S, S]``."""

        im = self._open(i)
        if im is not None:
            im = im.resize((self.image_size, self.image_size), self._filter())
        return self._to_array(im)

    def train_image(self, i: int, rng: np.random.Generator) -> np.ndarray:
        """Training view of image ``i``: random crop, resize to S×S, random flip (REFERENCE §4)."""
        from PIL import Image

        im = self._open(i)
        if im is not None:
            box = train_crop_box(im.width, im.height, rng, self.crop_min_ratio)
            im = im.resize((self.image_size, self.image_size), self._filter(), box=box)
            if rng.random() < self.hflip_p:
                im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        else:
            rng.random()  # keep the random stream aligned
        return self._to_array(im)

    def __repr__(self) -> str:
        return (
            f"ImageSplit({str(self.root)!r}, {self.split!r}: {self.n_images} images x "
            f"{self.captions_per_image} captions, {self.image_size}px from {self.image_dir})"
        )
