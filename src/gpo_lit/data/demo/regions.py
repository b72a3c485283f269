"""Embedded synthetic demo data set in the SCAN precomp format, generated locally from a seed.

Scenes hold 1-4 objects, each with a colour (8), a shape (6), a size (small/large) and a position
(left/right/top/bottom/centre). Each image is ``n_regions`` region features of width ``feat_dim``:

- one region per object (plus, half the time, a second weaker view of it);
- "distractor" regions that look like partial objects: one or two attribute codes of *random*
  values (not the scene's), weaker than real objects;
- clutter (the rest, ~25 of 36): weak codes from a low-rank "background" subspace around a
  per-image background, through the same mapping.

A region's feature is ``relu(W2 tanh(W1 z) + b)`` of a latent code ``z`` (for objects the sum of
fixed random attribute embeddings plus instance jitter) times a gain (large > small > distractor),
plus noise, so features are non-negative and sparse-ish like ReLU CNN features. The embeddings and
the mapping are drawn once from the seed.

Within a scene the objects differ in (colour, shape) and in position. Captions are five
paraphrases per image from a small grammar with synonyms ("a big red ball", "a huge crimson
sphere") and varied word order ("on the left there is ...", "... to the left"); each names **every**
object with its size, colour and shape (its position 3 times in 4), lower-case, 6-36 words.

What the structure favours:

- Image side: **max-like pooling (max, k-max, GPO) over mean pooling.** Of 36 regions only the
  1-4 objects (and their second views) carry the scene; mean pooling averages them with ~30
  clutter regions whose per-image background varies, and with the distractors, whose attribute
  codes are random, so the mean is dominated by what the captions never mention. A pooling that
  picks the strongest responses per dimension keeps the objects.
- Text side: the content words (size, colour, shape, position) are spread over the sentence, so
  pooling over all words helps.
- The loss: a caption identifies its scene up to the rare scene with the same objects, so
  in-batch negatives are nearly all true negatives. Measured on the default training split, a
  batch of 128 captions holds on average 1.0 pair of captions of one image and 2.3 pairs of
  captions whose scenes hold the same objects (mostly one-object scenes; a named position often
  still tells them apart); the paper masks neither. Hardest-negative training then works after
  the paper's one all-negatives epoch. (Version 1 of this generator often named only some
  objects: many in-batch "negatives" matched such a partial caption, and hardest negatives
  collapsed the loss unless the warm-up lasted 6 of 10 epochs.)
- Difficulty: the objects are noisy codes through a random non-linear map, mixed with partial-
  object distractors; retrieval is learnable on a CPU in minutes and approaches, but does not
  reach, the ceiling.

Files: ``root/{train,dev,test}_{ims.npy,caps.txt,ids.txt}`` and ``root/demo_meta.json``. Generation
is idempotent (same meta: nothing is rewritten) and never clobbers a different existing demo.

    python -m gpo_lit.data.demo.regions --root data/demo [--seed 0] [--n-train 6000] ...
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gpo_lit.data.demo.protocol import (
    DemoFolder,
    check_counts,
    existing,
    generator_cli,
    settings_of,
)
from gpo_lit.data.demo.vocab import COLOURS, POSITIONS, SHAPES, SIZES, pick
from gpo_lit.data.formats.precomp import write_precomp_split
from gpo_lit.errors import expect

GENERATOR_VERSION = 2
META_FILE = "demo_meta.json"
SPLITS = ("train", "dev", "test")

# object = one index into each (demo.vocab)
ATTRS: tuple[dict[str, Any], ...] = (COLOURS, SHAPES, SIZES, POSITIONS)

LATENT, HIDDEN, CLUTTER_RANK = 32, 192, 8
N_OBJECTS_P = np.array([0.15, 0.35, 0.3, 0.2])  # P(1..4 objects)
P_POSITION = 0.75  # a caption names an object's position
MIN_WORDS = 6  # at most 4 objects x 8 words + a 3-word opener: 6-36 words
OPENERS = ["a picture of", "an image showing", "this photo shows", "we can see", "there is",
           "a simple scene with", "a rendering of"]  # fmt: skip


@dataclass(frozen=True)
class _World:
    """Fixed random attribute embeddings and region mapping, drawn once from the seed."""

    emb: tuple[np.ndarray, ...]  # per attribute: [n_values, LATENT]
    w1: np.ndarray  # [LATENT, HIDDEN]
    w2: np.ndarray  # [HIDDEN, D]
    b: np.ndarray  # [D]
    clutter: np.ndarray  # [CLUTTER_RANK, LATENT] basis of background codes

    @classmethod
    def draw(cls, rng: np.random.Generator, feat_dim: int) -> _World:
        scales = (1.0, 1.0, 0.7, 0.7)  # colour and shape dominate appearance
        emb = tuple(
            rng.normal(0, s / np.sqrt(LATENT), (len(a), LATENT))
            for a, s in zip(ATTRS, scales, strict=True)
        )
        w1 = rng.normal(0, 1.5 / np.sqrt(LATENT), (LATENT, HIDDEN))
        w2 = rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, feat_dim))
        clutter = rng.normal(0, 1 / np.sqrt(LATENT), (CLUTTER_RANK, LATENT))
        return cls(emb, w1, w2, np.full(feat_dim, -0.2), clutter)

    def features(self, z: np.ndarray) -> np.ndarray:
        """Latent codes ``[..., LATENT]`` -> non-negative region features ``[..., D]``."""
        return np.maximum(np.tanh(z @ self.w1) @ self.w2 + self.b, 0.0)


def _scene(rng: np.random.Generator) -> np.ndarray:
    """Objects of one image: int ``[n_obj, 4]`` (colour, shape, size, position); within a scene the
    (colour, shape) pairs and the positions are distinct, so a caption tells its objects apart."""
    n = rng.choice(4, p=N_OBJECTS_P) + 1
    kind = rng.permutation(len(COLOURS) * len(SHAPES))[:n]
    objs = np.stack(
        [
            kind // len(SHAPES),
            kind % len(SHAPES),
            rng.integers(len(SIZES), size=n),
            rng.permutation(len(POSITIONS))[:n],
        ],
        axis=1,
    )
    return objs


def _image(world: _World, objs: np.ndarray, n_regions: int, rng: np.random.Generator) -> np.ndarray:
    """Region features ``[n_regions, D]`` of one scene, in random order."""
    z, gain = [], []
    for o in objs:
        code = sum(e[v] for e, v in zip(world.emb, o, strict=True))
        g = 1.0 if o[2] == 1 else 0.75  # large objects activate more
        z.append(code + rng.normal(0, 0.7 / np.sqrt(LATENT), LATENT))
        gain.append(g)
        if rng.random() < 0.5:  # a second, weaker view of the same object
            z.append(code + rng.normal(0, 0.8 / np.sqrt(LATENT), LATENT))
            gain.append(0.6 * g)
    n_distract = min(int(rng.integers(1, 7)), n_regions - len(z))
    for _ in range(n_distract):  # partial objects: one or two random attribute codes
        parts = rng.permutation(2)[: rng.integers(1, 3)]
        code = sum(world.emb[a][rng.integers(len(ATTRS[a]))] for a in parts)
        z.append(code + rng.normal(0, 0.3 / np.sqrt(LATENT), LATENT))
        gain.append(rng.uniform(0.3, 0.6))
    n_clutter = n_regions - len(z)
    # clutter: codes in a low-rank "background" subspace around a per-image background
    u = rng.normal(0, 0.25, CLUTTER_RANK) + rng.normal(0, 0.4, (n_clutter, CLUTTER_RANK))
    z.extend(u @ world.clutter)
    gain.extend(rng.uniform(0.1, 0.4, n_clutter))
    x = world.features(np.stack(z)) * np.array(gain)[:, None]
    x = np.maximum(x + rng.normal(0, 0.1, x.shape), 0.0)
    return x[rng.permutation(n_regions)]


def _phrase(o: np.ndarray, rng: np.random.Generator) -> tuple[str, str | None]:
    """(noun phrase, position key or None) of one object: its size, colour and shape always (a
    synonym of each), its position usually."""
    colour, shape, size = (list(a.values())[v] for a, v in zip(ATTRS[:3], o[:3], strict=True))
    words = [pick(rng, size), pick(rng, colour), pick(rng, shape)]
    article = "an" if words[0][0] in "aeiou" else "a"
    pos = list(POSITIONS)[o[3]] if rng.random() < P_POSITION else None
    return f"{article} {' '.join(words)}", pos


def _caption(objs: np.ndarray, rng: np.random.Generator) -> str:
    """One lower-case caption naming every object of the scene, in random order."""
    parts = []
    for i, j in enumerate(rng.permutation(len(objs))):
        np_, pos = _phrase(objs[j], rng)
        if pos is None:
            parts.append(np_)
        elif i == 0 and rng.random() < 0.3:  # position first: "on the left there is a red ball"
            parts.append(f"{pick(rng, POSITIONS[pos][1])} there is {np_}")
        else:
            parts.append(f"{np_} {pick(rng, POSITIONS[pos][0])}")
    body = _join(parts)
    if " there is " in parts[0]:  # already a sentence
        return body
    opener = pick(rng, OPENERS) if rng.random() < 0.85 else ""
    sentence = f"{opener} {body}".strip()
    if len(sentence.split()) < MIN_WORDS:
        sentence += " " + pick(rng, ["on a plain background", "in the picture", "in this scene"])
    return sentence


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _split(world: _World, n: int, n_regions: int, k: int, rng: np.random.Generator):
    """Scenes (int ``[n_obj, 4]`` each), features float32 ``[n, R, D]`` and ``n * k`` captions of
    one split, all from ``rng`` in one fixed order."""
    ims = np.empty((n, n_regions, world.w2.shape[1]), np.float32)
    scenes: list[np.ndarray] = []
    caps: list[str] = []
    for i in tqdm(range(n), desc="demo data: scenes", unit="scene", mininterval=1.0):
        objs = _scene(rng)
        ims[i] = _image(world, objs, n_regions, rng)
        caps.extend(_caption(objs, rng) for _ in range(k))
        scenes.append(objs)
    return scenes, ims, caps


@dataclass(frozen=True)
class RegionDemo:
    """The region demo's settings: the keyword arguments of :func:`generate_demo`,
    :func:`demo_scenes` and the command line (checked on creation), and the one place the demo's
    random streams are drawn (:meth:`draw`)."""

    seed: int = 0
    n_train: int = 6000
    n_dev: int = 500
    n_test: int = 1000
    n_regions: int = 36
    feat_dim: int = 128
    captions_per_image: int = 5

    def __post_init__(self) -> None:
        check_counts("demo", n_train=self.n_train, n_dev=self.n_dev, n_test=self.n_test,
                     n_regions=self.n_regions, feat_dim=self.feat_dim,
                     captions_per_image=self.captions_per_image)  # fmt: skip
        expect(
            self.n_regions >= 20,
            "demo n_regions",
            "at least 20 (objects, views, distractors, clutter)",
            self.n_regions,
        )

    @property
    def sizes(self) -> dict[str, int]:
        """Images per split."""
        return {"train": self.n_train, "dev": self.n_dev, "test": self.n_test}

    def draw(self) -> Iterator[tuple[str, list[np.ndarray], np.ndarray, list[str]]]:
        """Per split, in order: (split, scenes, features, captions), from one random stream for
        the world and one per split: every user of these settings sees the same scenes."""
        world_ss, *split_ss = np.random.SeedSequence(int(self.seed)).spawn(1 + len(SPLITS))
        world = _World.draw(np.random.default_rng(world_ss), self.feat_dim)
        for split, ss in zip(SPLITS, split_ss, strict=True):
            rng = np.random.default_rng(ss)
            n = self.sizes[split]
            yield split, *_split(world, n, self.n_regions, self.captions_per_image, rng)


def generate_demo(root: str | Path, *, overwrite: bool = False, **settings: int) -> Path:
    """Write the demo data set under ``root`` (if not already there) and return ``root``.

    ``settings``: the fields of :class:`RegionDemo` (seed, split sizes, regions, feature width,
    captions per image). Same settings give byte-identical files. Files already generated with
    the same meta are kept; a different demo (or other files with the same names) is an error
    unless ``overwrite`` (the generate-once protocol of :mod:`gpo_lit.data.demo.protocol`).
    """
    root = Path(root)
    demo = settings_of(RegionDemo, "demo", settings)
    meta = {
        "generator": "gpo_lit.data.demo",  # its module until 2026-12 (the meta is data: kept)
        "version": GENERATOR_VERSION,
        **asdict(demo),
        "seed": int(demo.seed),
    }
    names = [f"{s}_{kind}" for s in SPLITS for kind in ("ims.npy", "caps.txt", "ids.txt")]
    folder = DemoFolder(
        root,
        META_FILE,
        meta,
        [root / n for n in names],
        foreign=lambda: existing(root, names),
        what="precomp files",
    )
    if not folder.start(overwrite):
        return root
    for split, _, ims, caps in demo.draw():
        ids = [f"demo-{split}-{i:05d}" for i in range(demo.sizes[split])]
        write_precomp_split(root, split, ims, caps, ids)
    return folder.finish()


def demo_scenes(**settings: int) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """Per split: the scenes (int ``[n_obj, 4]``: colour, shape, size, position indices into
    ``COLOURS``, ``SHAPES``, ``SIZES``, ``POSITIONS``) and the captions that :func:`generate_demo`
    writes with the same ``settings`` (the same random streams), for renderers of the scenes."""
    drawn = settings_of(RegionDemo, "demo", settings).draw()
    return {split: (scenes, caps) for split, scenes, _, caps in drawn}


def main(argv: list[str] | None = None) -> int:
    return generator_cli(generate_demo, "python -m gpo_lit.data.demo.regions", argv, RegionDemo)


if __name__ == "__main__":
    sys.exit(main())
