"""Embedded synthetic demo *video* data set, generated locally from a seed, in the per-video
``.npy`` layout read by :class:`gpo_lit.data.formats.frames.FrameNpySplit`.

Each clip has 8-16 frames (variable) and one or two objects, each a colour (8) and a shape (6)
plus a script of what happens over time:

- ``static``: stays at one place (left / right / top / bottom / centre) the whole clip;
- ``moves``: travels left→right, right→left, top→bottom or bottom→top at constant speed;
- ``appears``: absent, then present from a frame in the first half-ish (25-60 % of the clip);
- ``disappears``: the mirror image of ``appears`` (same distribution of time present);
- ``blinks``: appears then disappears — present for only 1-3 frames in the middle;
- ``hides``: disappears then reappears — absent for only 1-3 frames in the middle;
- ``turns``: changes colour (c1 → c2) at a frame in the middle.

A frame's feature is ``relu(W2 tanh(W1 z_t) + b)`` plus noise, where the latent ``z_t`` sums a
per-clip background code and, for every object visible in frame t, fixed random embeddings of its
current colour and its shape, a code of its current position and a per-clip jitter. The
embeddings and the mapping are drawn once from the seed.

Captions (``captions_per_video`` per clip) describe what happens, from a grammar with synonyms:
"a red ball moves from left to right", "in this clip a navy box turns green while a golden star
flashes for a moment", "an emerald cone disappears then reappears on the left". Clips with two
objects mention both most of the time, otherwise one of them. Lower-case, 3-30 words (12 on average).

What the structure favours:

- **extreme-value pooling over frames.** Brief events (``blinks``: 1-3 frames out of 8-16),
  objects present in only part of the clip and two objects superposed in one frame are diluted by
  mean pooling and kept by max-like pooling. Measured (``experiment=demo_video``, test split, 500
  clips / 3,000 captions): GPO on both sides rsum 431.0, mean on both 294.5; visual GPO + text
  mean 415.5, visual mean + text GPO 277.5 — the gap is on the visual side. The learned visual θ
  is one-hot at the *last* rank (per-dimension minimum of the projected frames: the same
  extreme-value selection as max, up to the sign of the learned projection); the text θ is
  U-shaped (0.35 at the last rank, 0.10 at the first).
- **order-only pairs** that no permutation-invariant pooling over per-frame features can separate:
  ``moves`` left→right vs right→left (the same set of positions), ``appears`` vs ``disappears``
  (identically distributed fraction of frames present), ``turns`` c1→c2 vs c2→c1 (the same set of
  colours). Mean, max, K-max and GPO see these as the same clip; the sequence poolers
  (``temporal_transformer``, ``lstm``) can tell them apart; the text side always can (word
  order). They are a small share of the errors: with GPO, 29 of 1,723 wrong top-1 text→video
  answers differ from the truth only in order, with the temporal Transformer 1 of 1,651 (its
  test rsum 425.0 with text GPO: t2v R@1 45.0 vs GPO's 42.6, v2t R@1 52.8 vs 56.2).
- not saturated: captions that mention one of two objects, omit colours or share objects and
  events with other clips leave GPO at t2v R@1 ≈ 43 after 10 epochs.

Files: ``root/features/<video_id>.npy`` (float32 ``(T, D)``), ``root/captions.json``
(``{video_id: [captions]}``), ``root/splits/{train,val,test}.txt`` and
``root/demo_video_meta.json``. Generation is idempotent (same meta: nothing is rewritten), safe
when several processes (DDP ranks) run it at once (they write the same bytes, atomically), and
never clobbers a different existing data set (:mod:`gpo_lit.data.demo.protocol`).

    python -m gpo_lit.data.demo.video --root data/demo_video [--seed 0] [--n-train 2000] ...
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpo_lit.data.demo.protocol import DemoFolder, check_counts, existing, generator_cli
from gpo_lit.data.demo.vocab import COLOURS, FLAT_WORDS, POSITIONS, SHAPES, pick
from gpo_lit.data.formats.base import lines_bytes
from gpo_lit.errors import expect
from gpo_lit.files import write_atomic

GENERATOR_VERSION = 1
META_FILE = "demo_video_meta.json"
SPLITS = ("train", "val", "test")
FEATURES_DIR, CAPTIONS_FILE, SPLITS_DIR = "features", "captions.json", "splits"

VIDEO_SHAPES = [[w for w in words if w not in FLAT_WORDS] for words in SHAPES.values()]
# where each place is (x, y in [0, 1], y down), and the vocabulary's phrases that place an object
ANCHORS = {
    k: (xy, POSITIONS[k][0])
    for k, xy in zip(
        POSITIONS, [(0.15, 0.5), (0.85, 0.5), (0.5, 0.15), (0.5, 0.85), (0.5, 0.5)], strict=True
    )
}
MOVES = {  # (from, to): direction phrases
    ("left", "right"): ["from left to right", "from the left to the right", "to the right",
                        "rightwards", "across to the right"],
    ("right", "left"): ["from right to left", "from the right to the left", "to the left",
                        "leftwards", "across to the left"],
    ("top", "bottom"): ["from top to bottom", "from the top to the bottom", "down", "downwards"],
    ("bottom", "top"): ["from bottom to top", "from the bottom to the top", "up", "upwards"],
}  # fmt: skip
EVENTS = ("static", "moves", "appears", "disappears", "blinks", "hides", "turns")
MOVE_VERBS = ["moves", "slides", "travels", "goes", "drifts"]
VERB_PHRASES = {
    "static": ["stays {pos}", "sits {pos}", "rests {pos}", "stays still {pos}", "remains {pos}",
               "does not move"],
    "appears": ["appears", "shows up", "comes into view", "pops up", "enters the scene"],
    "disappears": ["disappears", "vanishes", "goes away", "leaves the scene", "fades out"],
    "blinks": ["appears then disappears", "appears and then disappears", "shows up briefly",
               "flashes for a moment", "appears for a moment", "shows up then vanishes"],
    "hides": ["disappears then reappears", "disappears and then comes back",
              "vanishes for a moment", "briefly disappears", "hides for a moment then comes back"],
    "turns": ["turns {c2}", "becomes {c2}", "changes to {c2}", "changes colour to {c2}"],
}  # fmt: skip
LATER = ["after a while", "halfway through", "later on"]
OPENERS = ["in this clip", "in the video", "we see that", "a clip where", "a short video in which",
           "here"]  # fmt: skip
JOINERS = [" and ", " while ", " as ", ", and ", " and meanwhile "]

LATENT, HIDDEN, BG_RANK = 32, 192, 6


@dataclass(frozen=True)
class _World:
    """Fixed random embeddings and frame mapping, drawn once from the seed."""

    colour: np.ndarray  # [8, LATENT]
    shape: np.ndarray  # [6, LATENT]
    pos: np.ndarray  # [4, LATENT]: codes of x, y, x·y, (x-.5)² + (y-.5)²
    bg: np.ndarray  # [BG_RANK, LATENT]
    w1: np.ndarray  # [LATENT, HIDDEN]
    w2: np.ndarray  # [HIDDEN, D]
    b: np.ndarray  # [D]

    @classmethod
    def draw(cls, rng: np.random.Generator, feat_dim: int) -> _World:
        s = 1 / np.sqrt(LATENT)
        return cls(
            colour=rng.normal(0, 1.0 * s, (len(COLOURS), LATENT)),
            shape=rng.normal(0, 1.0 * s, (len(SHAPES), LATENT)),
            pos=rng.normal(0, 1.2 * s, (4, LATENT)),
            bg=rng.normal(0, 1.0 * s, (BG_RANK, LATENT)),
            w1=rng.normal(0, 1.5 * s, (LATENT, HIDDEN)),
            w2=rng.normal(0, 1 / np.sqrt(HIDDEN), (HIDDEN, feat_dim)),
            b=np.full(feat_dim, -0.2),
        )

    def position(self, xy: np.ndarray) -> np.ndarray:
        """Codes of positions ``[..., 2]`` -> ``[..., LATENT]`` (smooth, nonlinear in x, y)."""
        x, y = xy[..., 0] - 0.5, xy[..., 1] - 0.5
        phi = np.stack([2 * x, 2 * y, 4 * x * y, 4 * (x * x + y * y) - 0.5], axis=-1)
        return phi @ self.pos

    def features(self, z: np.ndarray) -> np.ndarray:
        """Latent codes ``[..., LATENT]`` -> non-negative frame features ``[..., D]``."""
        return np.maximum(np.tanh(z @ self.w1) @ self.w2 + self.b, 0.0)


@dataclass
class _Object:
    colour: int
    shape: int
    event: str
    anchor: str  # where it is (static / appears / ...), or the start of a move
    detail: tuple  # move: (from, to); turns: (c1, c2); others: ()
    visible: np.ndarray  # bool [T]
    colours: np.ndarray  # int [T]
    xy: np.ndarray  # float [T, 2]


def _script(rng: np.random.Generator, t: int, colour: int, shape: int, event: str, anchor: str):
    """What one object does over ``t`` frames."""
    visible = np.ones(t, bool)
    colours = np.full(t, colour)
    base = np.array(ANCHORS[anchor][0])
    xy = np.tile(base + rng.normal(0, 0.04, 2), (t, 1))
    detail: tuple = ()
    if event == "moves":
        a, b = list(MOVES)[rng.integers(len(MOVES))]
        anchor, detail = a, (a, b)
        u = np.linspace(0.0, 1.0, t)[:, None]
        start = np.array(ANCHORS[a][0]) + rng.normal(0, 0.04, 2)
        end = np.array(ANCHORS[b][0]) + rng.normal(0, 0.04, 2)
        xy = start + (end - start) * u
    elif event in ("appears", "disappears"):
        t0 = int(rng.integers(round(0.25 * t), round(0.6 * t) + 1))
        if event == "appears":
            visible[:t0] = False
        else:  # mirror image: the same distribution of frames present
            visible[t - t0 :] = False
    elif event in ("blinks", "hides"):
        w = int(rng.integers(1, max(2, t // 5) + 1))
        s = int(rng.integers(1, t - w))  # never at the first or last frame
        if event == "blinks":
            visible[:] = False
            visible[s : s + w] = True
        else:
            visible[s : s + w] = False
    elif event == "turns":
        c2 = int((colour + rng.integers(1, len(COLOURS))) % len(COLOURS))
        t0 = int(rng.integers(round(0.3 * t), round(0.7 * t) + 1))
        colours[t0:] = c2
        detail = (colour, c2)
    return _Object(colour, shape, event, anchor, detail, visible, colours, xy)


def _clip(world: _World, rng: np.random.Generator, t: int) -> tuple[list[_Object], np.ndarray]:
    """Objects and frame features ``[t, D]`` of one clip."""
    n_obj = 1 if rng.random() < 0.45 else 2
    kinds = rng.permutation(len(COLOURS) * len(SHAPES))[:n_obj]  # distinct (colour, shape)
    anchors = rng.permutation(list(ANCHORS))[:n_obj]
    objs = [
        _script(
            rng,
            t,
            int(k // len(SHAPES)),
            int(k % len(SHAPES)),
            EVENTS[rng.integers(len(EVENTS))],
            str(a),
        )
        for k, a in zip(kinds, anchors, strict=True)
    ]
    bg = rng.normal(0, 0.5, BG_RANK) @ world.bg  # per-clip background
    z = np.tile(bg, (t, 1)) + rng.normal(0, 0.15 / np.sqrt(LATENT), (t, LATENT))
    for o in objs:
        jitter = rng.normal(0, 0.4 / np.sqrt(LATENT), LATENT)
        code = world.colour[o.colours] + world.shape[o.shape] + world.position(o.xy) + jitter
        z += code * o.visible[:, None]
    x = world.features(z)
    x = np.maximum(x + rng.normal(0, 0.08, x.shape), 0.0)
    return objs, x.astype(np.float32)


def _colour_word(rng: np.random.Generator, c: int) -> str:
    return pick(rng, list(COLOURS.values())[c])


def _sentence(o: _Object, rng: np.random.Generator) -> str:
    """One clause about one object: "a crimson box slides from left to right"."""
    shape = pick(rng, VIDEO_SHAPES[o.shape])
    pos = pick(rng, ANCHORS[o.anchor][1])
    if o.event == "turns":
        c1, c2 = o.detail
        if rng.random() < 0.3:
            np_ = f"a {shape} changes from {_colour_word(rng, c1)} to {_colour_word(rng, c2)}"
            return _article(np_)
        vp = pick(rng, VERB_PHRASES["turns"]).format(c2=_colour_word(rng, c2))
        return _article(f"a {_colour_word(rng, c1)} {shape} {vp}")
    noun = f"{_colour_word(rng, o.colour)} {shape}" if rng.random() < 0.9 else shape
    if o.event == "moves":
        vp = f"{pick(rng, MOVE_VERBS)} {pick(rng, MOVES[o.detail])}"
    else:
        vp = pick(rng, VERB_PHRASES[o.event])
        if "{pos}" in vp:
            vp = vp.format(pos=pos)
        elif o.event != "static" and rng.random() < 0.4:
            vp = f"{vp} {pos}"
        if o.event in ("appears", "disappears") and rng.random() < 0.3:
            vp = f"{vp} {pick(rng, LATER)}"
    return _article(f"a {noun} {vp}")


def _article(phrase: str) -> str:
    """Fix "a" before a vowel ("an emerald cone", "an orb")."""
    return "an" + phrase[1:] if phrase.startswith("a ") and phrase[2] in "aeiou" else phrase


def _caption(objs: list[_Object], rng: np.random.Generator) -> str:
    """One lower-case caption about one or both objects."""
    mention = list(objs)
    if len(objs) == 2 and rng.random() < 0.25:
        mention = [objs[rng.integers(2)]]
    elif len(objs) == 2 and rng.random() < 0.5:
        mention = mention[::-1]
    body = pick(rng, JOINERS).join(_sentence(o, rng) for o in mention)
    if rng.random() < 0.5:
        body = f"{pick(rng, OPENERS)} {body}"
    return body.replace(" ,", ",")


def _split(world: _World, n: int, frames: tuple[int, ...], k: int, rng: np.random.Generator):
    """Per-clip features ``[T_i, D]`` and ``k`` captions per clip."""
    feats, caps = [], []
    for _ in range(n):
        t = int(rng.integers(frames[0], frames[1] + 1))
        objs, x = _clip(world, rng, t)
        feats.append(x)
        caps.append([_caption(objs, rng) for _ in range(k)])
    return feats, caps


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def video_ids(split: str, n: int) -> list[str]:
    return [f"demo-video-{split}-{i:05d}" for i in range(n)]


def generate_demo_video(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 250,
    n_test: int = 500,
    n_frames: tuple[int, int] | list[int] = (8, 16),
    feat_dim: int = 64,
    captions_per_video: int = 6,
    overwrite: bool = False,
) -> Path:
    """Write the demo video data set under ``root`` (if not already there) and return ``root``.

    ``n_frames`` = (fewest, most) frames per clip, drawn uniformly per clip. Same seed and sizes
    give byte-identical files. Files already generated with the same meta are kept; a different
    demo (or other files in the way) is an error unless ``overwrite``.
    """
    root = Path(root)
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    try:  # a list, tuple or Hydra ListConfig
        frames = tuple(int(f) for f in n_frames)
    except (TypeError, ValueError):
        frames = ()
    expect(
        len(frames) == 2 and 3 <= frames[0] <= frames[1],
        "demo n_frames",
        "[fewest, most] frames per clip with 3 <= fewest <= most",
        n_frames,
    )
    check_counts("demo", n_train=n_train, n_val=n_val, n_test=n_test, feat_dim=feat_dim,
                 captions_per_video=captions_per_video)  # fmt: skip
    meta = {
        "generator": "gpo_lit.data.demo_video",  # its module until 2026-12 (kept: data)
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "n_train": n_train,
        "n_val": n_val,
        "n_test": n_test,
        "n_frames": list(frames),
        "feat_dim": feat_dim,
        "captions_per_video": captions_per_video,
    }
    feat_dir = root / FEATURES_DIR
    names = [CAPTIONS_FILE, *(f"{SPLITS_DIR}/{s}.txt" for s in SPLITS)]
    files = [root / n for n in names]
    files += [feat_dir / f"{v}.npy" for s in SPLITS for v in video_ids(s, sizes[s])]
    folder = DemoFolder(
        root,
        META_FILE,
        meta,
        files,
        foreign=lambda: existing(root, [*names, f"{FEATURES_DIR}/"]),
        what="video demo files",
        mark_complete=True,
    )
    # overwrite=True: stale clips of an earlier, larger demo go
    if not folder.start(overwrite, stale=lambda: feat_dir.glob("demo-video-*.npy")):
        return root
    feat_dir.mkdir(exist_ok=True)
    (root / SPLITS_DIR).mkdir(exist_ok=True)
    world_ss, *split_ss = np.random.SeedSequence(int(seed)).spawn(1 + len(SPLITS))
    world = _World.draw(np.random.default_rng(world_ss), feat_dim)
    captions: dict[str, list[str]] = {}
    for split, ss in zip(SPLITS, split_ss, strict=True):
        ids = video_ids(split, sizes[split])
        feats, caps = _split(
            world, sizes[split], frames, captions_per_video, np.random.default_rng(ss)
        )
        for vid, x, c in zip(ids, feats, caps, strict=True):
            write_atomic(feat_dir / f"{vid}.npy", _npy_bytes(x))
            captions[vid] = c
        write_atomic(root / SPLITS_DIR / f"{split}.txt", lines_bytes(ids))
    write_atomic(root / CAPTIONS_FILE, (json.dumps(captions, indent=0) + "\n").encode())
    return folder.finish()


def main(argv: list[str] | None = None) -> int:
    return generator_cli(generate_demo_video, "python -m gpo_lit.data.demo.video", argv)


if __name__ == "__main__":
    sys.exit(main())
