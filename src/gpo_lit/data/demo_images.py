"""The demo data set as small JPEG images in the raw-image layout (REFERENCE §7), for grid models.

The scenes and captions are those of :mod:`gpo_lit.data.demo` (same seed and sizes → the same
scenes the captions describe); each scene is rendered as coloured shapes (ball, cube, cylinder,
cone, ring, star) at their positions (left/right/top/bottom/centre) and sizes (small/large) on a
textured background with clutter (thin lines, specks, and a few small grey "partial objects"), plus
pixel noise, then saved as JPEG.

Files under ``root``: ``precomp/{split}_{ids,caps}.txt``, ``id_mapping.json``,
``images/{id}.jpg`` and ``demo_images_meta.json`` (written last; same meta → nothing rewritten; a
different demo or foreign files are never overwritten unless ``overwrite=True``).

    python -m gpo_lit.data.demo_images --root data/demo_images [--n-train 2000] ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpo_lit.data.demo import COLOURS, SPLITS, demo_scenes, is_generated
from gpo_lit.data.demo import GENERATOR_VERSION as SCENES_VERSION
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
# centre of each position, as fractions of the side (order of demo.POSITIONS)
CENTRES = [(0.22, 0.5), (0.78, 0.5), (0.5, 0.22), (0.5, 0.78), (0.5, 0.5)]
RADIUS = [0.1, 0.17]  # small, large (fraction of the side)


def _shape(draw, shape: int, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    """Draw shape index ``shape`` (order of demo.SHAPES) centred at (cx, cy) with radius r."""
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
        fill = tuple(int(np.clip(c + rng.normal(0, 12), 0, 255)) for c in RGB[names[colour]])
        _shape(draw, shape, cx, cy, r, fill)  # type: ignore[arg-type]
    x = np.asarray(im, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "RGB")


def generate_demo_images(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 500,
    image_size: int = 64,
    captions_per_image: int = 5,
    quality: int = 90,
    overwrite: bool = False,
) -> Path:
    """Write the image demo under ``root`` (if not already there) and return ``root``."""
    root = Path(root)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, v in [*sizes.items(), ("image_size", image_size),
                    ("captions_per_image", captions_per_image)]:  # fmt: skip
        expect(int(v) == v and v >= 1, f"demo_images {name}", "a positive integer", v)
    expect(image_size >= 16, "demo_images image_size", "at least 16 pixels", image_size)
    meta = {
        "generator": "gpo_lit.data.demo_images",
        "version": GENERATOR_VERSION,
        "scenes_version": SCENES_VERSION,  # the scenes and captions of gpo_lit.data.demo
        "seed": int(seed),
        "n_train": n_train,
        "n_dev": n_dev,
        "n_test": n_test,
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "quality": quality,
    }
    meta_path = root / META_FILE
    text_files = [root / "precomp" / f"{s}_{k}.txt" for s in SPLITS for k in ("ids", "caps")]
    files = [*text_files, root / "id_mapping.json"]
    if is_generated(meta_path, meta, files, overwrite):
        return root
    if not overwrite and not meta_path.is_file():
        clash = [str(f.relative_to(root)) for f in files if f.exists()]
        if (root / "images").is_dir() and any((root / "images").iterdir()):
            clash.append("images/")
        expect(not clash, root, f"no data files without {META_FILE} (or overwrite=True)", clash)

    (root / "precomp").mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last: its presence means "complete"
    scenes = demo_scenes(
        seed, n_train, n_dev, n_test, captions_per_image=captions_per_image
    )  # same scenes and captions as the region demo with these sizes
    render_ss = np.random.SeedSequence((int(seed), 7919)).spawn(len(SPLITS))
    mapping: dict[str, str] = {}
    for split, ss in zip(SPLITS, render_ss, strict=True):
        objs_list, caps = scenes[split]
        rng = np.random.default_rng(ss)
        ids = [f"demo-{split}-{i:05d}" for i in range(len(objs_list))]
        bar = tqdm(ids, desc=f"demo images: {split}", unit="image", mininterval=1.0)
        for image_id, objs in zip(bar, objs_list, strict=True):
            im = render_scene(objs, image_size, rng)
            name = f"{image_id}.jpg"
            write_atomic(
                root / "images" / name,
                lambda f, im=im: im.save(f, "JPEG", quality=quality),  # type: ignore[misc]
            )
            mapping[image_id] = name
        write_atomic(
            root / "precomp" / f"{split}_caps.txt",
            lambda f, c=caps: f.write(("\n".join(c) + "\n").encode()),  # type: ignore[misc]
        )
        write_atomic(
            root / "precomp" / f"{split}_ids.txt",
            lambda f, c=ids: f.write(("\n".join(c) + "\n").encode()),  # type: ignore[misc]
        )
    write_atomic(
        root / "id_mapping.json",
        lambda f: f.write((json.dumps(mapping, indent=0, sort_keys=True) + "\n").encode()),
    )
    write_atomic(
        meta_path, lambda f: f.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    )
    return root


def main(argv: list[str] | None = None) -> int:
    from gpo_lit.data.demo import generator_cli

    return generator_cli(generate_demo_images, "python -m gpo_lit.data.demo_images", argv)


if __name__ == "__main__":
    sys.exit(main())
