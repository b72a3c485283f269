"""Synthetic demo data: deterministic, idempotent, never clobbers, readable by the precomp reader."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest

from gpo_lit.data.demo import META_FILE, SPLITS, generate_demo, main
from gpo_lit.data.precomp import PrecompSplit
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
            assert c == c.lower() and 6 <= len(c.split()) <= 20, c
    meta = json.loads((root / META_FILE).read_text())
    assert meta["seed"] == 0 and meta["n_train"] == 12 and meta["version"] >= 1


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
    d = {k: v.default for k, v in inspect.signature(generate_demo).parameters.items()}
    n = d["n_train"] + d["n_dev"] + d["n_test"]
    assert n * d["n_regions"] * d["feat_dim"] * 4 < 150e6


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(tmp_path), "--n-train", "5", "--n-dev", "2", "--n-test", "3"]
    argv += ["--n-regions", "20", "--feat-dim", "8"]
    assert main(argv) == 0
    assert PrecompSplit(tmp_path, "test").n_captions == 15
    capsys.readouterr()  # the progress bars of that generation
    assert main([*argv, "--seed", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
