"""The demo data set as small JPEG images in the raw-image layout (REFERENCE §7), for grid models.

The scenes and captions are those of :mod:`gpo_lit.data.demo.regions` (same seed and sizes → the same
scenes the captions describe); each scene is rendered as coloured shapes (ball, cube, cylinder,
cone, ring, star) at their positions (left/right/top/bottom/centre) and sizes (small/large) on a
textured background with clutter (thin lines, specks, and a few small grey "partial objects"), plus
pixel noise, then saved as JPEG.

Files under ``root``: ``precomp/{split}_{ids,caps}.txt``, ``id_mapping.json``,
``images/{id}.jpg`` and ``demo_images_meta.json`` (written last; same meta → nothing rewritten; a
different demo or foreign files are never overwritten unless ``overwrite=True``).

    python -m gpo_lit.data.demo.images --root data/demo_images [--n-train 2000] ...
"""

from __future__ import annotations

import io
import json
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpo_lit.data.demo.protocol import (
    DemoFolder,
    check_counts,
    existing,
    generator_cli,
    settings_of,
)
from gpo_lit.data.demo.regions import GENERATOR_VERSION as SCENES_VERSION
from gpo_lit.data.demo.regions import SPLITS, demo_scenes
from gpo_lit.data.demo.vocab import COLOURS
from gpo_lit.data.formats.base import lines_bytes
from gpo_lit.errors import expect
from gpo_lit.files import write_atomic

GENERATOR_VERSION = 1
META_FILE = "demo_images_meta.json"

RGB = {
    "red": (220, 30, 30),
    "blue": (30, 60, 220),
    "green": (30, 190, 40),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# centre of each position, as fractions of the side (order of vocab.POSITIONS)
CENTRES = [(0.22, 0.5), (0.78, 0.5), (0.5, 0.22), (0.5, 0.78), (0.5, 0.5)]
RADIUS = [0.1, 0.17]  # small, large (fraction of the side)


def _shape(draw, shape: int, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """Draw shape index ``shape`` (order of vocab.SHAPES) centred at (cx, cy) with radius r."""
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == 0:  # ball
        draw.ellipse(box, fill=fill)
    elif shape == 1:  # cube: square with a lighter top face
        draw.rectangle(box, fill=fill)
        light = tuple(min(255, c + 60) for c in fill)
        draw.polygon([(cx - r, cy - r), (cx + r, cy - r), (cx + 0.6 * r, cy - 0.6 * r),
                      (cx - 0.6 * r, cy - 0.6 * r)], fill=light)  # fmt: skip
    elif shape == 2:  # cylinder: tall rectangle with elliptic caps
        w = 0.6 * r
        draw.rectangle((cx - w, cy - r + 0.3 * r, cx + w, cy + r - 0.3 * r), fill=fill)
        draw.ellipse((cx - w, cy + r - 0.6 * r, cx + w, cy + r), fill=fill)
        light = tuple(min(255, c + 60) for c in fill)
        draw.ellipse((cx - w, cy - r, cx + w, cy - r + 0.6 * r), fill=light)
    elif shape == 3:  # cone
        draw.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=fill)
    elif shape == 4:  # ring
        draw.ellipse(box, outline=fill, width=max(2, int(0.4 * r)))
    else:  # star
        pts = []
        for k in range(10):
            a = np.pi / 2 + k * np.pi / 5
            rr = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rr * np.cos(a), cy - rr * np.sin(a)))
        draw.polygon(pts, fill=fill)


def render_scene(objs: np.ndarray, size: int, rng: np.random.Generator):
    """A PIL RGB image of one scene (objects int ``[n, 4]``) with background clutter."""
    from PIL import Image, ImageDraw

    base = rng.integers(70, 180, 3)
    grad = np.linspace(-25, 25, size)[:, None, None] * rng.uniform(-1, 1, 3)
    bg = np.clip(base[None, None, :] + grad + rng.normal(0, 6, (size, size, 3)), 0, 255)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 6))):  # clutter: thin lines
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        grey = int(rng.integers(40, 220))
        draw.line((x0, y0, x1, y1), fill=(grey, grey, grey), width=1)
    for _ in range(int(rng.integers(0, 3))):  # partial objects: small grey blobs
        cx, cy = rng.uniform(0.1, 0.9, 2) * size
        grey = int(rng.integers(60, 200))
        _shape(draw, int(rng.integers(6)), cx, cy, 0.06 * size, (grey, grey, grey))
    names = list(COLOURS)
    # large objects first so small ones stay visible
    for colour, shape, big, pos in sorted(objs.tolist(), key=lambda o: -o[2]):
        cx, cy = (np.array(CENTRES[pos]) + rng.normal(0, 0.03, 2)) * size
        r = RADIUS[big] * size * rng.uniform(0.9, 1.1)
        red, green, blue = (int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in RGB[names[colour]])
        _shape(draw, shape, cx, cy, r, (red, green, blue))
    x = np.asarray(im, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


Sample = tuple[str, bytes, str, list[str]]  # (key, JPEG bytes, "jpg", captions)


@dataclass(frozen=True)
class ImageDemo:
    """What the image demo and its shards (:mod:`gpo_lit.data.demo.shards`) share: the settings
    (the keyword arguments of both generators and their command lines), checked once, and the
    rendered images, drawn once."""

    seed: int = 0
    n_train: int = 2000
    n_dev: int = 200
    n_test: int = 500
    image_size: int = 64
    captions_per_image: int = 5
    quality: int = 90

    @classmethod
    def checked(cls, who: str, settings: dict, **counts: int) -> ImageDemo:
        """The ``settings`` of generator ``who`` (named in errors); ``counts``: its own positive
        integers (checked too)."""
        demo = settings_of(cls, who, settings)
        check_counts(who, n_train=demo.n_train, n_dev=demo.n_dev, n_test=demo.n_test,
                     image_size=demo.image_size, captions_per_image=demo.captions_per_image,
                     **counts)  # fmt: skip
        expect(demo.image_size >= 16, f"{who} image_size", "at least 16 pixels", demo.image_size)
        return demo

    @property
    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def meta(self) -> dict:
        """The meta entries of these settings."""
        return {**asdict(self), "seed": int(self.seed)}

    def samples(self) -> dict[str, Iterator[Sample]]:
        """Per split, lazily: ``(key, JPEG bytes, "jpg", captions)`` of each image — the scenes
        and captions of the region demo with these sizes (:func:`demo_scenes`), rendered from
        one random stream per split."""
        k = self.captions_per_image
        scenes = demo_scenes(seed=self.seed, n_train=self.n_train, n_dev=self.n_dev,
                             n_test=self.n_test, captions_per_image=k)  # fmt: skip
        render_ss = np.random.SeedSequence((int(self.seed), 7919)).spawn(len(SPLITS))

        def split_samples(split: str, ss: np.random.SeedSequence) -> Iterator[Sample]:
            objs_list, caps = scenes[split]
            rng = np.random.default_rng(ss)
            for i, objs in enumerate(objs_list):
                buf = io.BytesIO()
                render_scene(objs, self.image_size, rng).save(buf, "JPEG", quality=self.quality)
                yield f"demo-{split}-{i:05d}", buf.getvalue(), "jpg", caps[k * i : k * i + k]

        return {s: split_samples(s, ss) for s, ss in zip(SPLITS, render_ss, strict=True)}


def generate_demo_images(root: str | Path, *, overwrite: bool = False, **settings: int) -> Path:
    """Write the image demo under ``root`` (if not already there) and return ``root``.

    ``settings``: the fields of :class:`ImageDemo` (seed, sizes, image size, captions per image,
    JPEG quality); the scenes and captions are the region demo's with these sizes.
    """
    root = Path(root)
    demo = ImageDemo.checked("demo_images", settings)
    meta = {
        "generator": "gpo_lit.data.demo_images",  # its module until 2026-12 (kept: data)
        "version": GENERATOR_VERSION,
        "scenes_version": SCENES_VERSION,  # the scenes and captions of the region demo
        **demo.meta(),
    }
    names = [f"precomp/{s}_{k}.txt" for s in SPLITS for k in ("ids", "caps")]
    names.append("id_mapping.json")
    folder = DemoFolder(
        root,
        META_FILE,
        meta,
        [root / n for n in names],
        foreign=lambda: existing(root, [*names, "images/"]),
        what="data files",
    )
    if not folder.start(overwrite):
        return root
    (root / "precomp").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    for split, samples in demo.samples().items():
        ids, caps = [], []
        bar = tqdm(samples, desc=f"demo images: {split}", unit="image", mininterval=1.0,
                   total=demo.sizes[split])  # fmt: skip
        for image_id, jpeg, ext, image_caps in bar:
            name = f"{image_id}.{ext}"
            write_atomic(root / "images" / name, jpeg)
            mapping[image_id] = name
            ids.append(image_id)
            caps.extend(image_caps)
        write_atomic(root / "precomp" / f"{split}_caps.txt", lines_bytes(caps))
        write_atomic(root / "precomp" / f"{split}_ids.txt", lines_bytes(ids))
    mapping_text = json.dumps(mapping, indent=0, sort_keys=True) + "\n"
    write_atomic(root / "id_mapping.json", mapping_text.encode())
    return folder.finish()


def main(argv: list[str] | None = None) -> int:
    return generator_cli(
        generate_demo_images, "python -m gpo_lit.data.demo.images", argv, ImageDemo
    )


if __name__ == "__main__":
    sys.exit(main())
