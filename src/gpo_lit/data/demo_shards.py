"""The image demo (:mod:`gpo_lit.data.demo_images`: same scenes, captions and renderer) packed
into webdataset tar shards, for the shard reader :class:`gpo_lit.data.formats.shards.ShardSplit`.

Files under ``root``: ``{split}-{000000…}.tar`` (``samples_per_shard`` images each; every sample
``<key>.jpg`` + ``<key>.txt`` (first caption) + ``<key>.json`` (``{"key", "captions"}``: all of
its captions)) and ``demo_shards_meta.json`` (written last; same meta → nothing rewritten; a
different demo or foreign shards are never overwritten unless ``overwrite=True``).

    python -m gpo_lit.data.demo_shards --root data/demo_shards [--n-train 2000] ...
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from gpo_lit.data.demo import SPLITS, demo_scenes, is_generated
from gpo_lit.data.demo_images import render_scene
from gpo_lit.data.formats.shards import write_shards
from gpo_lit.errors import expect
from gpo_lit.files import write_atomic

GENERATOR_VERSION = 1
META_FILE = "demo_shards_meta.json"


def demo_image_samples(
    seed: int, sizes: dict[str, int], image_size: int, captions_per_image: int, quality: int
) -> dict[str, Iterator[tuple[str, bytes, str, list[str]]]]:
    """Per split, lazily: ``(key, JPEG bytes, "jpg", captions)`` of each demo image — the images
    :func:`~gpo_lit.data.demo_images.generate_demo_images` renders with the same arguments (same
    random streams)."""
    scenes = demo_scenes(seed, sizes["train"], sizes["dev"], sizes["test"],
                         captions_per_image=captions_per_image)  # fmt: skip
    render_ss = np.random.SeedSequence((int(seed), 7919)).spawn(len(SPLITS))

    def split_samples(split: str, ss: np.random.SeedSequence):
        objs_list, caps = scenes[split]
        rng = np.random.default_rng(ss)
        k = captions_per_image
        for i, objs in enumerate(objs_list):
            buf = io.BytesIO()
            render_scene(objs, image_size, rng).save(buf, "JPEG", quality=quality)
            yield f"demo-{split}-{i:05d}", buf.getvalue(), "jpg", caps[k * i : k * i + k]

    return {s: split_samples(s, ss) for s, ss in zip(SPLITS, render_ss, strict=True)}


def generate_demo_shards(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_dev: int = 200,
    n_test: int = 500,
    image_size: int = 64,
    captions_per_image: int = 5,
    quality: int = 90,
    samples_per_shard: int = 500,
    overwrite: bool = False,
) -> Path:
    """Write the image demo as tar shards under ``root`` (if not already there); return ``root``."""
    root = Path(root)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, v in [*sizes.items(), ("image_size", image_size),
                    ("captions_per_image", captions_per_image),
                    ("samples_per_shard", samples_per_shard)]:  # fmt: skip
        expect(int(v) == v and v >= 1, f"demo_shards {name}", "a positive integer", v)
    expect(image_size >= 16, "demo_shards image_size", "at least 16 pixels", image_size)
    meta = {
        "generator": "gpo_lit.data.demo_shards",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        **{f"n_{s}": n for s, n in sizes.items()},
        "image_size": image_size,
        "captions_per_image": captions_per_image,
        "quality": quality,
        "samples_per_shard": samples_per_shard,
    }
    meta_path = root / META_FILE
    files = [
        root / f"{s}-{k:06d}.tar"
        for s, n in sizes.items()
        for k in range(math.ceil(n / samples_per_shard))
    ]
    if is_generated(meta_path, meta, files, overwrite):
        return root
    clash = sorted(p.name for p in root.glob("*.tar")) if root.is_dir() else []
    if not overwrite:
        expect(not clash, root, f"no tar shards without {META_FILE} (or overwrite=True)", clash)
    root.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last: its presence means "complete"
    for name in clash:  # overwrite=True: replace the old shards
        (root / name).unlink()
    samples = demo_image_samples(seed, sizes, image_size, captions_per_image, quality)
    for split in SPLITS:
        write_shards(samples[split], root / f"{split}-%06d.tar", samples_per_shard)
    write_atomic(
        meta_path, lambda f: f.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    )
    return root


def main(argv: list[str] | None = None) -> int:
    from gpo_lit.data.demo import generator_cli

    return generator_cli(generate_demo_shards, "python -m gpo_lit.data.demo_shards", argv)


if __name__ == "__main__":
    sys.exit(main())
