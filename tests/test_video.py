"""Video: HGR and per-video .npy readers, every bad file, sequence poolers, the video protocol,
the demo video generator, and training through the entry point on tiny trees."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from helpers import ENV, naive_metrics

import gpo_lit.pooling
from gpo_lit.data.demo.video import generate_demo_video
from gpo_lit.data.formats.frames import FrameNpySplit
from gpo_lit.data.formats.hgr import HGRSplit
from gpo_lit.data.formats.video import sample_frames
from gpo_lit.errors import GpoLitError, MissingFileError
from gpo_lit.metrics import evaluate
from gpo_lit.pooling import create_pooling
from gpo_lit.pooling.sequence import LSTMPooling, TemporalTransformerPooling

WORDS = [
    "a",
    "red",
    "ball",
    "moves",
    "to",
    "the",
    "left",
    "while",
    "blue",
    "cube",
    "appears",
    "then",
    "disappears",
]


def captions_for(vid: str, k: int) -> list[str]:
    rng = np.random.default_rng(zlib.crc32(vid.encode()))
    return [f"{vid} says " + " ".join(rng.choice(WORDS, 6)) + f" {c}" for c in range(k)]


def frames_of(i: int, t: int, d: int) -> np.ndarray:
    return (np.arange(t * d, dtype=np.float32).reshape(t, d) + 1000 * i) / 100


def make_npy_tree(
    root: Path,
    frames: list[int],
    dim: int = 4,
    k: int = 20,
    split: str = "train",
    extra_caps: dict | None = None,
) -> list[str]:
    """features/<vid>.npy, captions.json, splits/<split>.txt; returns the video ids."""
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    ids = [f"{split}{i}" for i in range(len(frames))]
    for i, (vid, t) in enumerate(zip(ids, frames, strict=True)):
        np.save(root / "features" / f"{vid}.npy", frames_of(i, t, dim))
    caps = {vid: captions_for(vid, k) for vid in ids} | (extra_caps or {})
    (root / "captions.json").write_text(json.dumps(caps))
    (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return ids


def make_hgr_tree(
    root: Path,
    frames: list[int],
    dim: int = 4,
    k: int = 20,
    splits: tuple[str, ...] = ("trn",),
    names_dtype: str = "U",
    slash: bool = False,
    release: bool = False,
) -> dict[str, list[str]]:
    """Flat: features.h5 {name: (T, D)}, ref_captions.json, {split}_names.npy. Release layout
    (``release``): ordered_feature/SA/resnet152.pth/{split}_ft.hdf5, annotation/RET/
    ref_captions.json, public_split/{split}_names.npy. Returns the names per split."""
    feat = root / "ordered_feature/SA/resnet152.pth" if release else root
    caps_dir = root / "annotation/RET" if release else root
    names_dir = root / "public_split" if release else root
    for d in (feat, caps_dir, names_dir):
        d.mkdir(parents=True, exist_ok=True)
    out, caps = {}, {}
    for s in splits:
        h5 = feat / (f"{s}_ft.hdf5" if release else "features.h5")
        with h5py.File(h5, "a") as f:
            names = [f"{s}/video{i}" if slash else f"{s}_video{i}" for i in range(len(frames))]
            for i, (n, t) in enumerate(zip(names, frames, strict=True)):
                f.create_dataset(n.replace("/", "_"), data=frames_of(i, t, dim))
                caps[n] = captions_for(n, k)
        np.save(names_dir / f"{s}_names.npy", np.asarray(names, dtype=names_dtype))
        out[s] = names
    caps["not_in_any_split"] = ["ignored caption"]
    (caps_dir / "ref_captions.json").write_text(json.dumps(caps))
    return out


def bad(fn, *names: str) -> str:
    """Expect a one-line GpoLitError naming every one of ``names``; return the message."""
    with pytest.raises(GpoLitError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for name in names:
        assert name in msg, msg
    return msg


# -- frame sampling ------------------------------------------------------------------------
def test_sample_frames_is_uniform_and_keeps_short_videos() -> None:
    np.testing.assert_array_equal(sample_frames(5, None), np.arange(5))
    np.testing.assert_array_equal(sample_frames(5, 12), np.arange(5))  # shorter: all frames
    np.testing.assert_array_equal(sample_frames(12, 12), np.arange(12))
    idx = sample_frames(40, 20)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == 39 and np.all(np.diff(idx) >= 1)
    np.testing.assert_array_equal(idx, sample_frames(40, 20))  # deterministic
    np.testing.assert_array_equal(sample_frames(9, 3), [0, 4, 8])
    np.testing.assert_array_equal(sample_frames(7, 1), [0])


# -- .npy folder ---------------------------------------------------------------------------
def test_npy_tree_reads_variable_frames_and_20_captions(tmp_path: Path) -> None:
    frames = [5, 30, 1, 12]
    ids = make_npy_tree(tmp_path, frames, dim=4, k=20)
    s = FrameNpySplit(tmp_path, "train")
    assert (s.n_images, s.n_captions, s.feat_dim) == (4, 80, 4)
    assert s.video_ids == ids and s.path == tmp_path / "features"
    assert s.cap2img.dtype == np.int64
    np.testing.assert_array_equal(s.cap2img, np.arange(80) // 20)
    np.testing.assert_array_equal(s.lengths, frames)
    for i, t in enumerate(frames):
        x = s.image(i)
        assert x.dtype == np.float32 and x.shape == (t, 4)
        np.testing.assert_array_equal(x, frames_of(i, t, 4))
    assert s.caption(21) == captions_for("train1", 20)[1] == s.captions[21]

    sampled = FrameNpySplit(tmp_path, "train", n_frames=12, max_images=2)
    np.testing.assert_array_equal(sampled.lengths, [5, 12])
    assert sampled.n_captions == 40
    np.testing.assert_array_equal(sampled.image(1), frames_of(1, 30, 4)[sample_frames(30, 12)])

    again = pickle.loads(pickle.dumps(sampled))
    np.testing.assert_array_equal(again.image(1), sampled.image(1))
    with pytest.raises(IndexError):
        s.image(4)


def test_npy_float16_features_come_back_float32(tmp_path: Path) -> None:
    make_npy_tree(tmp_path, [3, 4])
    np.save(tmp_path / "features" / "train1.npy", frames_of(1, 4, 4).astype(np.float16))
    x = FrameNpySplit(tmp_path, "train").image(1)
    assert x.dtype == np.float32 and x.shape == (4, 4)


def test_npy_csv_pairs_one_to_one_and_msrvtt_json(tmp_path: Path) -> None:
    """1k-A layout: train CSV (video_id), test CSV (video_id, sentence), MSRVTT_data.json."""
    (tmp_path / "features").mkdir()
    for i in range(6):
        np.save(tmp_path / "features" / f"video{i}.npy", frames_of(i, 3 + i, 8))
    sentences = [{"video_id": f"video{i}", "caption": f"clip {i} caption {c}", "sen_id": 0}
                 for i in range(6) for c in range(20)]  # fmt: skip
    (tmp_path / "MSRVTT_data.json").write_text(json.dumps({"videos": [], "sentences": sentences}))
    (tmp_path / "train.9k.csv").write_text("video_id\nvideo0\nvideo1\nvideo2\n")
    rows = ["key,vid_key,video_id,sentence"] + [
        f"ret{i},msr{i},video{i},test sentence {i}" for i in (5, 3, 4)
    ]
    (tmp_path / "test.csv").write_text("\n".join(rows) + "\n")
    files = {"train": "train.9k.csv", "test": "test.csv"}
    kw = {"captions_file": "MSRVTT_data.json", "split_files": files, "n_frames": 4}
    train = FrameNpySplit(tmp_path, "train", **kw)
    assert train.n_captions == 60 and train.caption(20) == "clip 1 caption 0"
    np.testing.assert_array_equal(train.cap2img, np.arange(60) // 20)
    test = FrameNpySplit(tmp_path, "test", **kw)
    assert test.video_ids == ["video5", "video3", "video4"]
    assert test.captions == ["test sentence 5", "test sentence 3", "test sentence 4"]
    np.testing.assert_array_equal(test.cap2img, [0, 1, 2])  # one caption per video
    np.testing.assert_array_equal(test.lengths, [4, 4, 4])  # 8, 6, 7 frames sampled to 4


def test_captions_of_videos_outside_the_split_are_ignored(tmp_path: Path) -> None:
    make_npy_tree(tmp_path, [2, 3], k=2, extra_caps={"elsewhere": ["not this one"]})
    s = FrameNpySplit(tmp_path, "train")
    assert s.n_captions == 4 and "not this one" not in s.captions


def _npy_case(root: Path, case: str) -> tuple[str, ...]:
    """Break a good .npy tree one way; return the strings the error must name."""
    make_npy_tree(root, [3, 4, 5], k=2)
    caps = json.loads((root / "captions.json").read_text())
    if case == "missing video":
        (root / "features" / "train1.npy").unlink()
        return ("train1.npy", "train.txt", "no such file")
    if case == "zero frames":
        np.save(root / "features" / "train2.npy", np.zeros((0, 4), np.float32))
        return ("train2.npy", "0 frames")
    if case == "width mismatch":
        np.save(root / "features" / "train1.npy", np.zeros((4, 5), np.float32))
        return ("train1.npy", "width 4", "5")
    if case == "1-d features":
        np.save(root / "features" / "train0.npy", np.zeros(4, np.float32))
        return ("train0.npy", "(frames, dim)")
    if case == "int features":
        np.save(root / "features" / "train0.npy", np.zeros((3, 4), np.int64))
        return ("train0.npy", "float", "int64")
    if case == "truncated npy":
        p = root / "features" / "train2.npy"
        p.write_bytes(p.read_bytes()[:-8])
        return ("train2.npy", "truncated")
    if case == "no captions for a listed video":
        del caps["train1"]
        (root / "captions.json").write_text(json.dumps(caps))
        return ("captions.json", "train1")
    if case == "empty caption list":
        caps["train2"] = []
        (root / "captions.json").write_text(json.dumps(caps))
        return ("captions.json", "train2", "empty list")
    if case == "empty caption":
        caps["train0"] = ["fine", "  "]
        (root / "captions.json").write_text(json.dumps(caps))
        return ("captions.json", "train0", "position 1")
    if case == "caption json is a list":
        (root / "captions.json").write_text("[1, 2]")
        return ("captions.json", "list")
    if case == "bad json":
        (root / "captions.json").write_text('{"train0": [')
        return ("captions.json", "invalid JSON")
    if case == "missing caption file":
        (root / "captions.json").unlink()
        return ("captions.json", "no such file")
    if case == "duplicate video in split":
        (root / "splits" / "train.txt").write_text("train0\ntrain1\ntrain0\n")
        return ("train.txt", "train0", "listed once")
    if case == "empty line in split":
        (root / "splits" / "train.txt").write_text("train0\n\ntrain1\n")
        return ("train.txt", "empty line 2")
    if case == "missing split list":
        (root / "splits" / "train.txt").unlink()
        return ("train.txt", "train.csv", "no such file")
    if case == "both txt and csv":
        (root / "splits" / "train.csv").write_text("video_id\ntrain0\n")
        return ("train.txt", "train.csv", "both")
    if case == "csv without video_id":
        (root / "splits" / "train.txt").unlink()
        (root / "splits" / "train.csv").write_text("vid\ntrain0\n")
        return ("train.csv", "video_id")
    if case == "csv with an empty sentence":
        (root / "splits" / "train.txt").unlink()
        (root / "splits" / "train.csv").write_text("video_id,sentence\ntrain0,hello\ntrain1,\n")
        return ("train.csv", "line 3")
    if case == "missing features folder":
        for f in (root / "features").iterdir():
            f.unlink()
        (root / "features").rmdir()
        return ("features", "no such folder")
    raise AssertionError(case)


NPY_CASES = [
    "missing video", "zero frames", "width mismatch", "1-d features", "int features",
    "truncated npy", "no captions for a listed video", "empty caption list", "empty caption",
    "caption json is a list", "bad json", "missing caption file", "duplicate video in split",
    "empty line in split", "missing split list", "both txt and csv", "csv without video_id",
    "csv with an empty sentence", "missing features folder",
]  # fmt: skip


@pytest.mark.parametrize("case", NPY_CASES)
def test_bad_npy_tree_is_one_line(tmp_path: Path, case: str) -> None:
    names = _npy_case(tmp_path, case)
    msg = bad(lambda: FrameNpySplit(tmp_path, "train"), *names)
    if "no such" in msg:
        with pytest.raises(MissingFileError):
            FrameNpySplit(tmp_path, "train")


def test_nan_frames_are_reported_on_access(tmp_path: Path) -> None:
    make_npy_tree(tmp_path, [3, 4], k=1)
    x = frames_of(1, 4, 4)
    x[2, 1] = np.nan
    np.save(tmp_path / "features" / "train1.npy", x)
    s = FrameNpySplit(tmp_path, "train")
    bad(lambda: s.image(1), "train1.npy", "1 NaN/inf")
    assert FrameNpySplit(tmp_path, "train", check_finite=False).image(1).shape == (4, 4)


# -- HGR -----------------------------------------------------------------------------------
@pytest.mark.parametrize("names_dtype", ["U", "S"])
def test_hgr_tree_reads(tmp_path: Path, names_dtype: str) -> None:
    frames = [25, 7, 20, 40]
    names = make_hgr_tree(tmp_path, frames, dim=6, k=20, splits=("trn", "tst"),
                          names_dtype=names_dtype, slash=True)  # fmt: skip
    s = HGRSplit(tmp_path, "train")  # train -> trn
    assert s.video_ids == names["trn"] and s.path == tmp_path / "features.h5"
    assert (s.n_images, s.n_captions, s.feat_dim) == (4, 80, 6)
    np.testing.assert_array_equal(s.cap2img, np.arange(80) // 20)
    np.testing.assert_array_equal(s.lengths, frames)
    np.testing.assert_array_equal(s.image(3), frames_of(3, 40, 6))
    assert s.caption(40) == captions_for(names["trn"][2], 20)[0]

    t = HGRSplit(tmp_path, "test", n_frames=20, max_images=3)  # test -> tst
    np.testing.assert_array_equal(t.lengths, [20, 7, 20])
    np.testing.assert_array_equal(t.image(0), frames_of(0, 25, 6)[sample_frames(25, 20)])
    assert t.n_captions == 60

    # The handle is opened lazily, never pickled, and the copy reads the same data.
    assert t._file is not None
    copy = pickle.loads(pickle.dumps(t))
    assert copy._file is None
    np.testing.assert_array_equal(copy.image(2), t.image(2))


def test_hgr_per_split_feature_files(tmp_path: Path) -> None:
    make_hgr_tree(tmp_path, [3, 4], splits=("val",))
    (tmp_path / "feats").mkdir()
    (tmp_path / "features.h5").rename(tmp_path / "feats" / "val_ft.hdf5")
    s = HGRSplit(tmp_path, "val", feature_file="feats/{split}_ft.hdf5")
    assert s.path == tmp_path / "feats" / "val_ft.hdf5" and s.image(1).shape == (4, 4)


def _hgr_case(root: Path, case: str) -> tuple[str, ...]:
    make_hgr_tree(root, [3, 4, 5], k=2)
    caps = json.loads((root / "ref_captions.json").read_text())
    if case == "names need pickle":
        np.save(root / "trn_names.npy", np.array(["a", 1], dtype=object), allow_pickle=True)
        return ("trn_names.npy", "pickle")
    if case == "names not strings":
        np.save(root / "trn_names.npy", np.arange(3))
        return ("trn_names.npy", "string array")
    if case == "names 2-d":
        np.save(root / "trn_names.npy", np.array([["a", "b"]]))
        return ("trn_names.npy", "1-d")
    if case == "missing video":
        with h5py.File(root / "features.h5", "a") as f:
            del f["trn_video1"]
        return ("features.h5", "trn_video1", "trn_names.npy")
    if case == "zero frames":
        with h5py.File(root / "features.h5", "a") as f:
            del f["trn_video2"]
            f.create_dataset("trn_video2", data=np.zeros((0, 4), np.float32))
        return ("features.h5", "trn_video2", "0 frames")
    if case == "width mismatch":
        with h5py.File(root / "features.h5", "a") as f:
            del f["trn_video1"]
            f.create_dataset("trn_video1", data=np.zeros((4, 7), np.float32))
        return ("features.h5", "trn_video1", "width 4", "7")
    if case == "a group, not a dataset":
        with h5py.File(root / "features.h5", "a") as f:
            del f["trn_video0"]
            f.create_group("trn_video0")
        return ("features.h5", "trn_video0", "Group")
    if case == "not hdf5":
        (root / "features.h5").write_bytes(b"not an hdf5 file at all")
        return ("features.h5", "HDF5")
    if case == "missing hdf5":
        (root / "features.h5").unlink()
        return ("features.h5", "no such file")
    if case == "no captions for a listed video":
        del caps["trn_video0"]
        (root / "ref_captions.json").write_text(json.dumps(caps))
        return ("ref_captions.json", "trn_video0")
    if case == "empty caption list":
        caps["trn_video1"] = []
        (root / "ref_captions.json").write_text(json.dumps(caps))
        return ("ref_captions.json", "trn_video1", "empty list")
    if case == "captions not a list":
        caps["trn_video1"] = "one caption"
        (root / "ref_captions.json").write_text(json.dumps(caps))
        return ("ref_captions.json", "trn_video1", "str")
    if case == "missing names file":
        (root / "trn_names.npy").unlink()
        return ("trn_names.npy", "no such file")
    if case == "duplicate names":
        np.save(root / "trn_names.npy", np.array(["trn_video0", "trn_video0"]))
        return ("trn_names.npy", "trn_video0", "listed once")
    raise AssertionError(case)


HGR_CASES = [
    "names need pickle", "names not strings", "names 2-d", "missing video", "zero frames",
    "width mismatch", "a group, not a dataset", "not hdf5", "missing hdf5",
    "no captions for a listed video", "empty caption list", "captions not a list",
    "missing names file", "duplicate names",
]  # fmt: skip


@pytest.mark.parametrize("case", HGR_CASES)
def test_bad_hgr_tree_is_one_line(tmp_path: Path, case: str) -> None:
    names = _hgr_case(tmp_path, case)
    bad(lambda: HGRSplit(tmp_path, "train"), *names)


def test_bad_reader_options_are_one_line(tmp_path: Path) -> None:
    make_hgr_tree(tmp_path, [3])
    bad(lambda: HGRSplit(tmp_path, "training"), "split", "training")
    bad(lambda: HGRSplit(tmp_path, "train", n_frames=0), "n_frames")
    bad(lambda: HGRSplit(tmp_path, "train", max_images=0), "max_images")


# -- sequence poolers ----------------------------------------------------------------------
def _poolers(dim: int = 16) -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [
        TemporalTransformerPooling(dim=dim, max_len=12, n_layers=2, n_heads=2, dropout=0.0),
        LSTMPooling(dim=dim),
        LSTMPooling(dim=dim, bidirectional=True, n_layers=2),
    ]


@pytest.mark.parametrize("k", [0, 1, 2])
@pytest.mark.parametrize("train", [True, False])
def test_sequence_pooling_padding_never_leaks(k: int, train: bool) -> None:
    pool = _poolers()[k].train(train)
    torch.manual_seed(1)
    lengths = torch.tensor([3, 7, 1, 5])
    x = torch.randn(4, 7, 16)
    garbage = x.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = float("nan") if i % 2 else 1e6
    with torch.set_grad_enabled(train):
        out = pool(garbage, lengths)
        assert out.shape == (4, 16) and torch.isfinite(out).all()
        for i, n in enumerate(lengths.tolist()):  # each alone, unpadded
            alone = pool(x[i : i + 1, :n], lengths[i : i + 1])
            torch.testing.assert_close(out[i], alone[0], atol=1e-5, rtol=1e-5)
    if train:
        xg = garbage.clone().requires_grad_(True)
        pool(xg, lengths).sum().backward()
        for i, n in enumerate(lengths.tolist()):
            assert torch.all(xg.grad[i, n:] == 0) and torch.isfinite(xg.grad[i, :n]).all()


@pytest.mark.parametrize("k", [0, 1])
def test_sequence_pooling_sees_order(k: int) -> None:
    pool = _poolers()[k].eval()
    x = torch.randn(1, 6, 16)
    lengths = torch.tensor([6])
    with torch.no_grad():
        a, b = pool(x, lengths), pool(x.flip(1), lengths)
    assert not torch.allclose(a, b, atol=1e-4)  # not permutation-invariant by design


def test_sequence_pooling_registry_and_limits() -> None:
    for name in ("temporal_transformer", "lstm"):
        assert name in gpo_lit.pooling.available_poolings()
    p = create_pooling("temporal_transformer", dim=128)
    assert p.n_heads == 2 and p.max_len == 64
    bad(lambda: p(torch.zeros(1, 65, 128), torch.tensor([65])), "max_len=64", "65")
    bad(lambda: create_pooling("temporal_transformer", dim=30, n_heads=4), "n_heads", "dim 30")
    bad(lambda: create_pooling("lstm", dim=8, n_layers=0), "n_layers")
    bad(
        lambda: create_pooling("lstm", dim=8)(torch.zeros(2, 3, 8), torch.tensor([0, 3])), "lengths"
    )


# -- the video protocol --------------------------------------------------------------------
@pytest.mark.parametrize("per_video", [1, 20])
def test_video_protocol_matches_naive_ranking(per_video: int) -> None:
    rng = np.random.default_rng(per_video)
    n_vid, d = 60, 8
    cap2img = rng.permutation(np.repeat(np.arange(n_vid), per_video))  # any order
    img = rng.normal(size=(n_vid, d))
    cap = img[cap2img] + rng.normal(scale=1.5, size=(len(cap2img), d))  # noisy matches
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    cap /= np.linalg.norm(cap, axis=1, keepdims=True)
    got = evaluate(torch.from_numpy(img), torch.from_numpy(cap), torch.from_numpy(cap2img),
                   protocol="full", shard_size=7)  # fmt: skip
    want = naive_metrics(img @ cap.T, cap2img)  # brute force per query, MdR/MnR too
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < got["rsum"] < 600


# -- demo video generator ------------------------------------------------------------------
def test_demo_video_is_deterministic_idempotent_and_readable(tmp_path: Path) -> None:
    kw = {"n_train": 12, "n_val": 4, "n_test": 5, "captions_per_video": 3}
    a = generate_demo_video(tmp_path / "a", seed=3, **kw)
    b = generate_demo_video(tmp_path / "b", seed=3, **kw)
    for rel in ("captions.json", "splits/test.txt", "features/demo-video-train-00007.npy"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    stamp = (a / "captions.json").stat().st_mtime_ns
    generate_demo_video(a, seed=3, **kw)  # same meta: nothing rewritten
    assert (a / "captions.json").stat().st_mtime_ns == stamp
    bad(lambda: generate_demo_video(a, seed=4, **kw), "demo_video_meta.json", "overwrite")
    # an interrupted run (meta still marked incomplete) is finished by the next call
    meta = json.loads((a / "demo_video_meta.json").read_text())
    (a / "demo_video_meta.json").write_text(json.dumps({**meta, "complete": False}))
    (a / "captions.json").unlink()
    generate_demo_video(a, seed=3, **kw)
    assert (a / "captions.json").read_bytes() == (b / "captions.json").read_bytes()
    assert json.loads((a / "demo_video_meta.json").read_text())["complete"] is True
    s = FrameNpySplit(a, "train")
    assert (s.n_images, s.n_captions, s.feat_dim) == (12, 36, 64)
    assert 8 <= s.lengths.min() <= s.lengths.max() <= 16
    assert all(c == c.lower() and len(c.split()) >= 3 for c in s.captions)
    # another data set in the way is never clobbered
    make_npy_tree(tmp_path / "c", [3])
    bad(lambda: generate_demo_video(tmp_path / "c", **kw), "captions.json")


# -- end to end through the entry point ----------------------------------------------------
TINY = [
    "data.batch_size=32", "data.eval_batch_size=64", "trainer.max_epochs=1",
    "model.embed_dim=32", "model.visual.mlp_hidden=16", "logger=csv",
]  # fmt: skip


def train(tmp_path: Path, *args: str) -> dict:
    run_dir = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "gpo_lit.train", *args, *TINY, f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())["full"]


@pytest.mark.slow
def test_demo_video_trains_through_the_entry_point(tmp_path: Path) -> None:
    # the sequence poolers once gpo_lit.pooling registers them on import (a fresh process)
    probe = "import gpo_lit.pooling as p; print('temporal_transformer' in p.available_poolings())"
    sequence = (
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, timeout=120
        ).stdout.strip()
        == "True"
    )
    extra = ["+model/pooling@model.visual_pooling=temporal_transformer"] if sequence else []
    m = train(
        tmp_path, "experiment=demo_video", f"paths.data_dir={tmp_path / 'data'}",
        "++data.demo.n_train=96", "++data.demo.n_val=20", "++data.demo.n_test=24",
        "++data.demo.captions_per_video=4", *extra,
    )  # fmt: skip
    assert (tmp_path / "data" / "demo_video" / "demo_video_meta.json").is_file()
    assert set(m) >= {"i2t_r1", "t2i_r10", "i2t_medr", "t2i_meanr", "rsum"} and m["rsum"] > 0


@pytest.mark.slow
def test_hgr_tree_trains_through_the_entry_point(tmp_path: Path) -> None:
    """The paper's MSR-VTT experiment on a tiny tree in the HGR release layout."""
    frames = [25, 7, 20, 40] * 16
    make_hgr_tree(tmp_path / "hgr", frames, dim=12, k=4, splits=("trn", "val", "tst"), release=True)
    m = train(
        tmp_path, "experiment=msrvtt_resnet_bigru", f"data.root={tmp_path / 'hgr'}",
        "model.visual.in_dim=12", "data.num_workers=1",
    )  # fmt: skip
    assert m["rsum"] > 0
