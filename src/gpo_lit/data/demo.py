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

    python -m gpo_lit.data.demo --root data/demo [--seed 0] [--n-train 6000] ...
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gpo_lit.errors import GpoLitError, expect
from gpo_lit.files import write_atomic

GENERATOR_VERSION = 2
META_FILE = "demo_meta.json"
SPLITS = ("train", "dev", "test")

# attribute values and their synonyms (the first one is the canonical name)
COLOURS = {
    "red": ["red", "crimson", "scarlet"],
    "blue": ["blue", "navy", "azure"],
    "green": ["green", "emerald", "lime"],
    "yellow": ["yellow", "golden"],
    "purple": ["purple", "violet"],
    "orange": ["orange", "amber"],
    "white": ["white", "pale"],
    "black": ["black", "dark"],
}
SHAPES = {
    "ball": ["ball", "sphere", "circle", "orb"],
    "cube": ["cube", "box", "block"],
    "cylinder": ["cylinder", "tube", "can"],
    "cone": ["cone", "funnel"],
    "ring": ["ring", "hoop", "donut"],
    "star": ["star"],
}
SIZES = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
# (phrase after the object, phrase that opens the sentence)
POSITIONS = {
    "left": (["on the left", "to the left", "at the left side"], ["on the left", "to the left"]),
    "right": (["on the right", "to the right", "at the right side"], ["on the right"]),
    "top": (["at the top", "near the top", "up above"], ["at the top", "near the top"]),
    "bottom": (["at the bottom", "near the bottom", "down below"], ["at the bottom"]),
    "centre": (["in the centre", "in the middle", "at the center"], ["in the middle"]),
}
ATTRS = (COLOURS, SHAPES, SIZES, POSITIONS)  # object = one index into each

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
            rng.normal(0, s / np.sqrt(LATENT), (len(a), LATENT))  # type: ignore[arg-type]
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


def _pick(rng: np.random.Generator, options: list[str]) -> str:
    return options[rng.integers(len(options))]


def _phrase(o: np.ndarray, rng: np.random.Generator) -> tuple[str, str | None]:
    """(noun phrase, position key or None) of one object: its size, colour and shape always (a
    synonym of each), its position usually."""
    colour, shape, size = (list(a.values())[v] for a, v in zip(ATTRS[:3], o[:3], strict=True))
    words = [_pick(rng, size), _pick(rng, colour), _pick(rng, shape)]
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
            parts.append(f"{_pick(rng, POSITIONS[pos][1])} there is {np_}")
        else:
            parts.append(f"{np_} {_pick(rng, POSITIONS[pos][0])}")
    body = _join(parts)
    if " there is " in parts[0]:  # already a sentence
        return body
    opener = _pick(rng, OPENERS) if rng.random() < 0.85 else ""
    sentence = f"{opener} {body}".strip()
    if len(sentence.split()) < MIN_WORDS:
        sentence += " " + _pick(rng, ["on a plain background", "in the picture", "in this scene"])
    return sentence


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _split(world: _World, n: int, n_regions: int, k: int, rng: np.random.Generator):
    """Scenes (int ``[n_obj, 4]`` each), features float32 ``[n, R, D]`` and ``n * k`` captions of
    one split, all from ``rng`` in one fixed order."""
    ims = np.empty((n, n_regions, world.w2.shape[1]), np.float32)
    scenes, caps = [], []  # type: ignore[var-annotated]
    for i in tqdm(range(n), desc="demo data: scenes", unit="scene", mininterval=1.0):
        objs = _scene(rng)
        ims[i] = _image(world, objs, n_regions, rng)
        caps.extend(_caption(objs, rng) for _ in range(k))
        scenes.append(objs)
    return scenes, ims, caps


def _diff(meta: dict, old: object) -> tuple[str, str]:
    """The meta entries that differ, as ``k=v`` lists (wanted, found)."""
    if not isinstance(old, dict):
        return _kv(meta, list(meta)), "an unreadable meta file"
    keys = [k for k in sorted({*meta, *old}) if meta.get(k) != old.get(k)]
    return _kv(meta, keys), _kv(old, keys)


def _kv(d: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={d.get(k)}" for k in keys)


def is_generated(meta_path: Path, meta: dict, files: list[Path], overwrite: bool) -> bool:
    """True when ``meta_path`` records exactly ``meta`` and every file exists (nothing to do).

    A different recorded meta is an error unless ``overwrite``: a demo is never clobbered.
    """
    if overwrite or not meta_path.is_file():
        return False
    try:
        old = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        old = "unreadable"
    if old != meta:
        want, have = _diff(meta, old)
        raise GpoLitError(
            f"{meta_path}: expected a demo with {want} (use another root or overwrite=True), "
            f"found {have}"
        )
    return all(f.is_file() for f in files)


def generate_demo(
    root: str | Path,
    seed: int = 0,
    n_train: int = 6000,
    n_dev: int = 500,
    n_test: int = 1000,
    n_regions: int = 36,
    feat_dim: int = 128,
    captions_per_image: int = 5,
    overwrite: bool = False,
) -> Path:
    """Write the demo data set under ``root`` (if not already there) and return ``root``.

    Same seed and sizes give byte-identical files. Files already generated with the same meta are
    kept; a different demo (or other files with the same names) is an error unless ``overwrite``.
    """
    root = Path(root)
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    for name, v in [*sizes.items(), ("regions", n_regions), ("feat_dim", feat_dim),
                    ("captions_per_image", captions_per_image)]:  # fmt: skip
        expect(int(v) == v and v >= 1, f"demo {name}", "a positive integer", v)
    expect(
        n_regions >= 20,
        "demo regions",
        "at least 20 (objects, views, distractors, clutter)",
        n_regions,
    )
    meta = {
        "generator": "gpo_lit.data.demo",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_train": n_train,
        "n_dev": n_dev,
        "n_test": n_test,
        "n_regions": n_regions,
        "feat_dim": feat_dim,
        "captions_per_image": captions_per_image,
    }
    files = [root / f"{s}_{kind}" for s in SPLITS for kind in ("ims.npy", "caps.txt", "ids.txt")]
    meta_path = root / META_FILE
    if is_generated(meta_path, meta, files, overwrite):
        return root
    if not overwrite and not meta_path.is_file():
        clash = [f.name for f in files if f.exists()]
        expect(not clash, root, f"no precomp files without {META_FILE} (or overwrite=True)", clash)

    root.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # written last: its presence means "complete"
    world_ss, *split_ss = np.random.SeedSequence(int(seed)).spawn(1 + len(SPLITS))
    world = _World.draw(np.random.default_rng(world_ss), feat_dim)
    for split, ss in zip(SPLITS, split_ss, strict=True):
        _, ims, caps = _split(
            world, sizes[split], n_regions, captions_per_image, np.random.default_rng(ss)
        )
        ids = [f"demo-{split}-{i:05d}" for i in range(sizes[split])]
        write_atomic(root / f"{split}_ims.npy", lambda f, a=ims: np.save(f, a, allow_pickle=False))  # type: ignore[misc]
        write_atomic(
            root / f"{split}_caps.txt",
            lambda f, c=caps: f.write(("\n".join(c) + "\n").encode()),  # type: ignore[misc]
        )
        write_atomic(
            root / f"{split}_ids.txt",
            lambda f, c=ids: f.write(("\n".join(c) + "\n").encode()),  # type: ignore[misc]
        )
    write_atomic(
        meta_path, lambda f: f.write((json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    )
    return root


def generator_cli(generate: Callable[..., Path], prog: str, argv: list[str] | None) -> int:
    """Command line of a demo generator: ``--root`` plus one ``--option`` per keyword argument of
    ``generate`` (its defaults; a bool is a flag, a pair takes two numbers). Errors: one line,
    exit status 2."""
    p = argparse.ArgumentParser(prog=prog, description=(generate.__doc__ or "").splitlines()[0])
    p.add_argument("--root", required=True, help="output folder")
    for name, param in inspect.signature(generate).parameters.items():
        if name == "root":
            continue
        flag, default = f"--{name.replace('_', '-')}", param.default
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(default, tuple | list):
            p.add_argument(flag, type=type(default[0]), nargs=len(default), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    args = vars(p.parse_args(argv))
    try:
        root = generate(**args)
    except GpoLitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo data set in {root}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return generator_cli(generate_demo, "python -m gpo_lit.data.demo", argv)


if __name__ == "__main__":
    sys.exit(main())


def demo_scenes(
    seed: int = 0,
    n_train: int = 6000,
    n_dev: int = 500,
    n_test: int = 1000,
    n_regions: int = 36,
    feat_dim: int = 128,
    captions_per_image: int = 5,
) -> dict[str, tuple[list[np.ndarray], list[str]]]:
    """Per split: the scenes (int ``[n_obj, 4]``: colour, shape, size, position indices into
    ``COLOURS``, ``SHAPES``, ``SIZES``, ``POSITIONS``) and the captions of :func:`generate_demo`
    with the same arguments (same random streams), for renderers of the same scenes."""
    sizes = {"train": n_train, "dev": n_dev, "test": n_test}
    world_ss, *split_ss = np.random.SeedSequence(int(seed)).spawn(1 + len(SPLITS))
    world = _World.draw(np.random.default_rng(world_ss), feat_dim)
    out: dict[str, tuple[list[np.ndarray], list[str]]] = {}
    for split, ss in zip(SPLITS, split_ss, strict=True):  # the draws of generate_demo
        scenes, _, caps = _split(
            world, sizes[split], n_regions, captions_per_image, np.random.default_rng(ss)
        )
        out[split] = (scenes, caps)
    return out
