"""Checkpoints written before the readers moved into gpo_lit.data.formats and the demo generators
into gpo_lit.data.demo still load: their stored names are read as the new ones, and nothing
else is let through."""

from __future__ import annotations

import copy
import importlib

import pytest
from helpers import compose_cfg
from omegaconf import OmegaConf

from gpo_lit.components import DEMO_GENERATORS, MOVED, allowed_targets, check_stored_configs
from gpo_lit.errors import UnsafeCheckpointError

# the names the configs of the previous layout used (conf/data/*.yaml before 2026-12)
OLD_NAMES = {
    "gpo_lit.data.precomp.PrecompSplit",
    "gpo_lit.data.images.ImageSplit",
    "gpo_lit.data.video.HGRSplit",
    "gpo_lit.data.video.FrameNpySplit",
    "gpo_lit.data.demo.generate_demo",
    "gpo_lit.data.demo_images.generate_demo_images",
    "gpo_lit.data.demo_shards.generate_demo_shards",
    "gpo_lit.data.demo_video.generate_demo_video",
}


def _resolves(dotted: str) -> bool:
    module, _, name = dotted.rpartition(".")
    try:
        return hasattr(importlib.import_module(module), name)
    except ImportError:
        return False


def test_every_old_name_maps_to_a_loadable_component() -> None:
    assert set(MOVED) == OLD_NAMES
    for old, new in MOVED.items():
        assert not _resolves(old), old  # really moved: nothing answers to the old name
        assert _resolves(new), new
        assert new in allowed_targets() or new in DEMO_GENERATORS, new


@pytest.mark.parametrize("data", ["demo", "demo_images", "demo_shards", "demo_video"])
def test_a_stored_config_with_the_old_names_loads_as_today(data: str) -> None:
    """Today's composed data config, written with the old names, reads back as today's."""
    now = OmegaConf.to_container(compose_cfg("train", f"data={data}").data, resolve=True)
    new_to_old = {new: old for old, new in MOVED.items()}
    stored = copy.deepcopy(now)
    stored["demo_generator"] = new_to_old[now["demo_generator"]]
    if stored["reader"]["_target_"] in new_to_old:
        stored["reader"]["_target_"] = new_to_old[stored["reader"]["_target_"]]
    assert stored != now or data == "demo_shards"  # the shard reader did not move
    ckpt = {
        "gpo_lit_config": {"data": stored},
        "datamodule_hyper_parameters": copy.deepcopy(stored),
    }
    check_stored_configs("old.ckpt", ckpt)
    assert ckpt["gpo_lit_config"]["data"] == now
    assert ckpt["datamodule_hyper_parameters"] == now


def test_only_the_moved_names_are_renamed() -> None:
    ckpt = {"hyper_parameters": {"pool": {"_target_": "gpo_lit.data.precomp.os.system"}}}
    with pytest.raises(UnsafeCheckpointError, match="gpo_lit.data.precomp.os.system"):
        check_stored_configs("x.ckpt", ckpt)
