"""The image demo (:mod:`gpo_lit.data.demo.images`: same scenes, captions and renderer) packed
into webdataset tar shards, for the shard reader :class:`gpo_lit.data.formats.shards.ShardSplit`.

Files under ``root``: ``{split}-{000000…}.tar`` (``samples_per_shard`` images each; every sample
``<key>.jpg`` + ``<key>.txt`` (first caption) + ``<key>.json`` (``{"key", "captions"}``: all of
its captions)) and ``demo_shards_meta.json`` (written last; same meta → nothing rewritten; a
different demo or foreign shards are never overwritten unless ``overwrite=True``).

    python -m gpo_lit.data.demo.shards --root data/demo_shards [--n-train 2000] ...
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from gpo_lit.data.demo.images import ImageDemo
from gpo_lit.data.demo.protocol import DemoFolder, generator_cli
from gpo_lit.data.demo.regions import SPLITS
from gpo_lit.data.formats.shards import write_shards

GENERATOR_VERSION = 1
META_FILE = "demo_shards_meta.json"


def generate_demo_shards(
    root: str | Path, *, samples_per_shard: int = 500, overwrite: bool = False, **settings: int
) -> Path:
    """Write the image demo as tar shards under ``root`` (if not already there); return ``root``.

    ``settings``: those of :func:`~gpo_lit.data.demo.images.generate_demo_images` (the fields of
    :class:`~gpo_lit.data.demo.images.ImageDemo`): the same images, ``samples_per_shard`` a shard.
    """
    root = Path(root)
    demo = ImageDemo.checked("demo_shards", settings, samples_per_shard=samples_per_shard)
    meta = {
        "generator": "gpo_lit.data.demo_shards",  # its module until 2026-12 (kept: data)
        "version": GENERATOR_VERSION,
        **demo.meta(),
        "samples_per_shard": samples_per_shard,
    }
    files = [
        root / f"{s}-{k:06d}.tar"
        for s, n in demo.sizes.items()
        for k in range(math.ceil(n / samples_per_shard))
    ]

    def tars() -> list[Path]:
        return sorted(root.glob("*.tar")) if root.is_dir() else []

    folder = DemoFolder(
        root,
        META_FILE,
        meta,
        files,
        foreign=lambda: [p.name for p in tars()],
        what="tar shards",
    )
    if not folder.start(overwrite, stale=tars):  # overwrite=True: the old shards go
        return root
    samples = demo.samples()
    for split in SPLITS:
        write_shards(samples[split], root / f"{split}-%06d.tar", samples_per_shard, replace=True)
    return folder.finish()


def main(argv: list[str] | None = None) -> int:
    return generator_cli(
        generate_demo_shards, "python -m gpo_lit.data.demo.shards", argv, ImageDemo
    )


if __name__ == "__main__":
    sys.exit(main())
