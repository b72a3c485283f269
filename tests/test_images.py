"""Raw-image reader (REFERENCE §4, §7) and the demo scenes rendered as JPEGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import make_image_tree
from PIL import Image

from gpo_lit.data.demo.images import META_FILE, generate_demo_images
from gpo_lit.data.demo.regions import generate_demo
from gpo_lit.data.formats.base import SplitReader
from gpo_lit.data.formats.images import IMAGENET_MEAN, IMAGENET_STD, ImageSplit, train_crop_box
from gpo_lit.errors import GpoLitError, MissingFileError


def test_reader_layout_and_views(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "f30k")
    s = ImageSplit(root, "train", image_size=32)
    assert isinstance(s, SplitReader)
    assert (s.n_images, s.n_captions, s.feat_dim) == (4, 20, 3)
    assert s.cap2img.tolist() == [i // 5 for i in range(20)]
    assert s.image_dir == root / "images" / "flickr30k-images"  # found one folder below
    x = s.image(1)
    assert x.shape == (3, 32, 32) and x.dtype == np.float32
    # eval view = whole image resized, ImageNet-normalised
    im = Image.open(s.files[1]).convert("RGB").resize((32, 32), Image.BILINEAR)
    ref = np.asarray(im, np.float32).transpose(2, 0, 1) / 255 - np.reshape(IMAGENET_MEAN, (3, 1, 1))
    ref = ref / np.reshape(IMAGENET_STD, (3, 1, 1))
    np.testing.assert_allclose(x, ref, atol=1e-5)
    a = s.train_image(1, np.random.default_rng(5))
    b = s.train_image(1, np.random.default_rng(5))
    assert a.shape == (3, 32, 32) and np.array_equal(a, b)  # seeded
    assert not np.array_equal(a, s.train_image(1, np.random.default_rng(6)))
    assert ImageSplit(root, "dev", max_images=2, image_size=32).n_captions == 10


def test_train_crop_box_statistics() -> None:
    rng = np.random.default_rng(0)
    boxes = np.array([train_crop_box(500, 300, rng) for _ in range(4000)])
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 500).all() and (boxes[:, 3] <= 300).all()
    np.testing.assert_allclose(w / 500, h / 300, atol=0.01)  # same ratio for both sides
    assert (w / 500).min() > 0.59 and (w / 500).max() <= 1.0
    assert abs((w / 500).mean() - 0.8) < 0.01


def test_validation_errors_name_the_file(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "d")
    with pytest.raises(MissingFileError, match="testall_ids.txt"):
        ImageSplit(root, "testall")
    (root / "precomp" / "dev_caps.txt").write_text("one\ntwo\nthree\n")
    with pytest.raises(GpoLitError, match="dev_caps.txt: expected a multiple of 4 captions"):
        ImageSplit(root, "dev")
    mapping = json.loads((root / "id_mapping.json").read_text())
    first = (root / "precomp" / "test_ids.txt").read_text().split()[0]
    del mapping[first]
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    with pytest.raises(GpoLitError, match="id_mapping.json: expected an entry for every id"):
        ImageSplit(root, "test")


def test_missing_and_corrupt_images(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "d")
    s = ImageSplit(root, "train", image_size=16)
    Path(s.files[2]).write_bytes(b"not a jpeg")
    with pytest.raises(GpoLitError, match=r"\.jpg: expected a readable image") as e:
        s.image(2)
    assert "\n" not in str(e.value)
    lenient = ImageSplit(root, "train", image_size=16, skip_bad=True)
    assert np.array_equal(lenient.image(2), np.zeros((3, 16, 16), np.float32))
    assert lenient.train_image(2, np.random.default_rng(0)).shape == (3, 16, 16)
    assert lenient.n_bad == 2
    Path(s.files[3]).unlink()
    with pytest.raises(GpoLitError, match="found no such file .1 of 4 train images missing"):
        ImageSplit(root, "train")
    assert ImageSplit(root, "train", skip_bad=True).n_images == 4


def test_old_layout_with_one_id_per_caption(tmp_path: Path) -> None:
    root = make_image_tree(tmp_path / "d")
    ids = (root / "precomp" / "dev_ids.txt").read_text().split()
    (root / "precomp" / "dev_ids.txt").write_text("\n".join(i for i in ids for _ in range(5)))
    s = ImageSplit(root, "dev", image_size=16)
    assert s.n_images == 4 and s.n_captions == 20 and s.image_ids == ids


def test_demo_images_render_the_demo_scenes(tmp_path: Path) -> None:
    sizes = {"n_train": 12, "n_dev": 4, "n_test": 4}
    root = generate_demo_images(tmp_path / "img", image_size=32, **sizes)
    regions = generate_demo(tmp_path / "reg", **sizes)
    for split in ("train", "dev", "test"):  # the same captions as the region demo
        assert (root / "precomp" / f"{split}_caps.txt").read_text() == (
            regions / f"{split}_caps.txt"
        ).read_text()
    s = ImageSplit(root, "train", image_size=32)
    assert s.n_images == 12 and Image.open(s.files[0]).size == (32, 32)
    stamp = {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()}
    generate_demo_images(root, image_size=32, **sizes)  # idempotent: nothing rewritten
    assert stamp == {p: p.stat().st_mtime_ns for p in (root / "images").iterdir()}
    with pytest.raises(GpoLitError, match=META_FILE):
        generate_demo_images(root, image_size=48, **sizes)
    (root / META_FILE).unlink()
    with pytest.raises(GpoLitError, match="no data files without"):
        generate_demo_images(root, image_size=32, **sizes)


def test_red_object_is_red() -> None:
    """A large red ball on the left of the canvas is rendered red there."""
    from gpo_lit.data.demo.images import render_scene

    im = np.asarray(render_scene(np.array([[0, 0, 1, 0]]), 64, np.random.default_rng(0)))
    r, g, b = im[28:36, 10:18].reshape(-1, 3).mean(0)
    assert r > 150 and g < 90 and b < 90
