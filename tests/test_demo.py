"""Synthetic demo data: deterministic, idempotent, never clobbers, readable by the precomp reader."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from helpers import compose_cfg
from hydra import compose, initialize_config_dir

from gpo_lit.cli import CONF_DIR
from gpo_lit.data.demo.regions import (
    COLOURS,
    META_FILE,
    POSITIONS,
    SHAPES,
    SIZES,
    SPLITS,
    RegionDemo,
    demo_scenes,
    generate_demo,
    main,
)
from gpo_lit.data.formats.precomp import PrecompSplit
from gpo_lit.errors import GpoLitError

TINY = {"n_train": 12, "n_dev": 4, "n_test": 6, "n_regions": 20, "feat_dim": 16}


def files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


def test_deterministic(tmp_path: Path) -> None:
    a = files(generate_demo(tmp_path / "a", seed=3, **TINY))
    b = files(generate_demo(tmp_path / "b", seed=3, **TINY))
    c = files(generate_demo(tmp_path / "c", seed=4, **TINY))
    assert len(a) == 3 * len(SPLITS) + 1 and a == b
    for name in ("train_ims.npy", "train_caps.txt", "test_ims.npy"):
        assert a[name] != c[name]


def test_reader_opens_what_it_writes(tmp_path: Path) -> None:
    root = generate_demo(tmp_path, seed=0, **TINY)
    for split in SPLITS:
        s = PrecompSplit(root, split)
        assert s.n_images == TINY[f"n_{split}"] and s.captions_per_image == 5
        assert (s.n_regions, s.feat_dim) == (20, 16) and not s.repeated
        assert s.image_ids == [f"demo-{split}-{i:05d}" for i in range(s.n_images)]
        x = np.stack([s.image(i) for i in range(s.n_images)])
        assert x.min() >= 0 and x.max() > 0  # ReLU-like features
        for c in s.captions:
            assert c == c.lower() and 6 <= len(c.split()) <= 36, c
    meta = json.loads((root / META_FILE).read_text())
    assert meta["seed"] == 0 and meta["n_train"] == 12 and meta["version"] >= 1


# Which position a caption's phrase names, by its key word (written here, not taken from the
# generator, so that a wrong phrase table fails the test).
POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "above": "top",
                  "bottom": "bottom", "below": "bottom", "centre": "centre", "center": "centre",
                  "middle": "centre"}  # fmt: skip


def _alts(table: dict[str, list[str]]) -> str:
    return "(" + "|".join(w for ws in table.values() for w in ws) + ")"


OBJECT = re.compile(rf"\b(?:a|an) {_alts(SIZES)} {_alts(COLOURS)} {_alts(SHAPES)}\b")


def named_objects(caption: str) -> list[tuple[str, str, str, str | None]]:
    """(size, colour, shape, position or None) of each object phrase ``a SIZE COLOUR SHAPE``, the
    position taken from the words up to the next object ("… on the left, a …") or, for the first
    object, from an opening "on the left there is …"."""
    syn = {w: k for table in (COLOURS, SHAPES, SIZES) for k, ws in table.items() for w in ws}
    found = []
    matches = list(OBJECT.finditer(caption))
    for i, m in enumerate(matches):
        size, colour, shape = (syn[w] for w in m.groups())
        end = matches[i + 1].start() if i + 1 < len(matches) else len(caption)
        tail = caption[m.end() : end].split()
        if i == 0 and " there is " in caption[: m.start()]:
            tail = caption[: m.start()].split()
        pos = {POSITION_WORDS[w] for w in tail if w in POSITION_WORDS}
        assert len(pos) <= 1, caption
        found.append((size, colour, shape, pos.pop() if pos else None))
    return found


def test_captions_name_every_object_of_their_scene() -> None:
    """Each caption names exactly the scene's objects (size, colour and shape, by some synonym)
    and, where it gives one, each object's own position: no caption is a partial description."""
    out = demo_scenes(seed=5, n_train=60, n_dev=5, n_test=5, n_regions=20, feat_dim=8)
    names = [list(t) for t in (COLOURS, SHAPES, SIZES, POSITIONS)]
    n_pos = n_obj = 0
    for scenes, caps in out.values():
        assert len(caps) == 5 * len(scenes)
        for i, objs in enumerate(scenes):
            assert 1 <= len(objs) <= 4 and len(set(objs[:, 3])) == len(objs)  # distinct places
            assert len({(c, h) for c, h, _, _ in objs}) == len(objs)  # and kinds
            want = sorted((names[2][s], names[0][c], names[1][h]) for c, h, s, _ in objs)
            where = {(names[2][s], names[0][c], names[1][h]): names[3][p] for c, h, s, p in objs}
            for cap in caps[5 * i : 5 * i + 5]:
                got = named_objects(cap)
                assert sorted(g[:3] for g in got) == want, (cap, want)
                for g in got:
                    n_obj += 1
                    if g[3] is not None:
                        n_pos += 1
                        assert where[g[:3]] == g[3], (cap, where)
    assert 0.5 < n_pos / n_obj < 0.95  # positions are named often, not always


def test_scenes_match_the_written_captions(tmp_path: Path) -> None:
    """demo_scenes (for renderers) returns the captions generate_demo writes, same arguments."""
    root = generate_demo(tmp_path, seed=2, **TINY)
    out = demo_scenes(seed=2, **TINY)
    for split in SPLITS:
        assert (root / f"{split}_caps.txt").read_text().splitlines() == out[split][1]
        assert len(out[split][0]) == TINY[f"n_{split}"]


def test_few_strong_regions(tmp_path: Path) -> None:
    """Objects stand out of the clutter: the strongest region is well above the median one."""
    root = generate_demo(tmp_path, **{**TINY, "n_train": 40, "feat_dim": 64})
    s = PrecompSplit(root, "train")
    norms = np.linalg.norm(np.stack([s.image(i) for i in range(40)]), axis=-1)  # [images, R]
    ratio = norms.max(1) / np.median(norms, axis=1)
    assert ratio.min() > 1.2 and ratio.mean() > 1.8


def test_idempotent(tmp_path: Path) -> None:
    root = generate_demo(tmp_path, **TINY)
    stamps = {p.name: p.stat().st_mtime_ns for p in root.iterdir()}
    assert generate_demo(tmp_path, **TINY) == root
    assert {p.name: p.stat().st_mtime_ns for p in root.iterdir()} == stamps


def test_refuses_to_clobber_a_different_demo(tmp_path: Path) -> None:
    generate_demo(tmp_path, seed=0, **TINY)
    before = files(tmp_path)
    with pytest.raises(GpoLitError) as e:
        generate_demo(tmp_path, seed=1, **TINY)
    assert "\n" not in str(e.value) and META_FILE in str(e.value)
    assert files(tmp_path) == before
    generate_demo(tmp_path, seed=1, overwrite=True, **TINY)
    assert files(tmp_path)["train_ims.npy"] != before["train_ims.npy"]


def test_refuses_to_clobber_foreign_files(tmp_path: Path) -> None:
    (tmp_path / "train_caps.txt").write_text("somebody's real captions\n")
    with pytest.raises(GpoLitError) as e:
        generate_demo(tmp_path, **TINY)
    assert "\n" not in str(e.value) and "train_caps.txt" in str(e.value)
    assert (tmp_path / "train_caps.txt").read_text() == "somebody's real captions\n"


def test_regenerates_missing_files(tmp_path: Path) -> None:
    root = generate_demo(tmp_path, **TINY)
    before = files(root)
    (root / "dev_ims.npy").unlink()
    generate_demo(root, **TINY)
    assert files(root) == before


def test_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(GpoLitError):
        generate_demo(tmp_path, **{**TINY, "n_train": 0})
    with pytest.raises(GpoLitError):
        generate_demo(tmp_path, **{**TINY, "n_regions": 5})


def test_default_size_budget() -> None:
    """The default demo stays under 150 MB of features."""
    d = RegionDemo()  # generate_demo's defaults
    n = d.n_train + d.n_dev + d.n_test
    assert n * d.n_regions * d.feat_dim * 4 < 150e6


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(tmp_path), "--n-train", "5", "--n-dev", "2", "--n-test", "3"]
    argv += ["--n-regions", "20", "--feat-dim", "8"]
    assert main(argv) == 0
    assert PrecompSplit(tmp_path, "test").n_captions == 15
    capsys.readouterr()  # the progress bars of that generation
    assert main([*argv, "--seed", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err


def test_demo_experiment_keeps_the_papers_loss_and_optimiser() -> None:
    """Only the size deviates (d, epochs, decay epoch, test split); loss warm-up and optimiser as
    the paper's (REFERENCE §3, §5)."""
    cfg = compose_cfg("train", "experiment=demo", "paths.output_dir=unused")
    assert cfg.loss.all_negatives_epochs == 1 and cfg.loss.margin == 0.2
    assert not cfg.loss.mask_same_image
    assert (cfg.optim.lr, cfg.optim.decay_gamma, cfg.data.batch_size) == (5e-4, 0.1, 128)
    assert cfg.trainer.gradient_clip_val == 2.0
    assert cfg.model.pooling.name == "gpo" and cfg.data.augment.region_keep_prob == 0.8
    # README "Demo results": 5 epochs, the decay at epoch 2 (three low-lr epochs), 5,000 test scenes
    assert (cfg.trainer.max_epochs, list(cfg.optim.decay_epochs)) == (6, [3])
    assert cfg.data.demo.n_test == 5000 and cfg.evaluation.test_protocols == ["full"]


def test_pooling_sweep_is_4_poolings_by_3_seeds() -> None:
    """The README's pooling sweep: GPO, max, mean, k-max × seeds 0-2, two at a time with
    ``hydra/launcher=parallel``."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            ["experiment=demo", "+sweep=pooling", "hydra/launcher=parallel"],
            return_hydra_config=True,
        )
    params = cfg.hydra.sweeper.params
    assert set(params["model/pooling@model.visual_pooling"].split(",")) == {
        "gpo", "max", "mean", "kmax"
    }  # fmt: skip
    assert [int(s) for s in str(params.seed).split(",")] == [0, 1, 2]
    assert cfg.hydra.launcher.n_jobs == 2 and "joblib" in cfg.hydra.launcher._target_.lower()
