"""The one generate-once protocol of the demo generators (gpo_lit.data.demo.protocol), for all four:
an interrupted run is finished by the next call with the bytes a clean run writes, processes that
generate one folder at once (DDP ranks) both succeed with those bytes, and the generators share
one vocabulary."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from gpo_lit.data.demo import images, regions, shards, video, vocab
from gpo_lit.errors import GpoLitError

GENERATORS: dict[str, tuple[Callable[..., Path], str, dict]] = {
    "regions": (regions.generate_demo, regions.META_FILE,
                {"n_train": 12, "n_dev": 4, "n_test": 5, "n_regions": 20, "feat_dim": 8}),
    "images": (images.generate_demo_images, images.META_FILE,
               {"n_train": 6, "n_dev": 3, "n_test": 3, "image_size": 16}),
    "shards": (shards.generate_demo_shards, shards.META_FILE,
               {"n_train": 6, "n_dev": 3, "n_test": 3, "image_size": 16, "samples_per_shard": 4}),
    "video": (video.generate_demo_video, video.META_FILE,
              {"n_train": 6, "n_val": 3, "n_test": 3, "feat_dim": 8, "captions_per_video": 2}),
}  # fmt: skip


def contents(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``; a tar shard by its members' names and bytes (its
    headers hold the time it was written)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".tar":
            with tarfile.open(p) as t:
                data = b"".join(m.name.encode() + t.extractfile(m).read() for m in t.getmembers())
        else:
            data = p.read_bytes()
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.parametrize("name", list(GENERATORS))
def test_an_interrupted_run_is_finished_with_the_clean_bytes(tmp_path: Path, name: str) -> None:
    generate, meta_file, kw = GENERATORS[name]
    clean = contents(generate(tmp_path / "clean", **kw))
    root = generate(tmp_path / "cut", **kw)
    meta = json.loads((root / meta_file).read_text())
    # as a run stopped half-way leaves it: the meta marked incomplete, some files not yet there
    (root / meta_file).write_text(json.dumps({**meta, "complete": False}))
    written = sorted(p for p in root.rglob("*") if p.is_file() and p.name != meta_file)
    for p in written[len(written) // 2 :]:
        p.unlink()
    assert generate(root, **kw) == root
    assert contents(root) == clean
    # a different demo recorded there is still refused, in one line naming the meta file
    with pytest.raises(GpoLitError) as e:
        generate(root, **{**kw, "seed": 9})
    assert meta_file in str(e.value) and "seed=9" in str(e.value) and "\n" not in str(e.value)


def _generate(name: str, root: str, queue) -> None:
    generate, _, kw = GENERATORS[name]
    try:
        generate(Path(root), **kw)
        queue.put("ok")
    except Exception as e:  # reported to the test, not raised in the child
        queue.put(f"{type(e).__name__}: {e}")


@pytest.mark.parametrize("name", list(GENERATORS))
def test_ranks_generating_one_folder_at_once_all_succeed(tmp_path: Path, name: str) -> None:
    generate, _, kw = GENERATORS[name]
    clean = contents(generate(tmp_path / "clean", **kw))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_generate, args=(name, str(tmp_path / "shared"), queue))
             for _ in range(3)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [queue.get(timeout=5) for _ in procs] == ["ok"] * 3
    assert contents(tmp_path / "shared") == clean


def test_one_vocabulary() -> None:
    """The region / image demos and the video demo name colours, shapes and places with the same
    words (the video demo leaves out the flat "circle"), in the vocabulary's order."""
    assert regions.COLOURS is vocab.COLOURS and video.COLOURS is vocab.COLOURS
    assert regions.SHAPES is vocab.SHAPES and regions.POSITIONS is vocab.POSITIONS
    # the video demo's shape words since version 1 (its captions depend on them)
    assert video.VIDEO_SHAPES[0] == ["ball", "sphere", "orb"]
    assert video.VIDEO_SHAPES[1:] == list(vocab.SHAPES.values())[1:]
    assert list(video.ANCHORS) == list(vocab.POSITIONS)
    for place, (_, phrases) in video.ANCHORS.items():
        assert phrases == vocab.POSITIONS[place][0]
    assert len(images.RGB) == len(vocab.COLOURS) and list(images.RGB) == list(vocab.COLOURS)


def test_unknown_image_demo_setting_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(GpoLitError, match=r"demo_shards: expected settings among seed, .*found "
                       r"n_val"):  # fmt: skip
        shards.generate_demo_shards(tmp_path, n_val=3)
    assert not tmp_path.joinpath(shards.META_FILE).exists()


@pytest.mark.parametrize("name", list(GENERATORS))
def test_a_folder_in_place_of_a_demo_file_is_one_line_and_nothing_is_rewritten(
    tmp_path: Path, name: str
) -> None:
    generate, meta_file, kw = GENERATORS[name]
    root = generate(tmp_path / "demo", **kw)
    victim = sorted(p for p in root.rglob("*") if p.is_file() and p.name != meta_file)[0]
    victim.unlink()
    victim.mkdir()
    before = contents(root)
    with pytest.raises(GpoLitError) as e:
        generate(root, **kw)
    assert str(e.value) == f"{victim}: expected a file (or none yet), found a folder"
    assert contents(root) == before  # the meta included
