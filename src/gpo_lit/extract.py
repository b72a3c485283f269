"""``gpo-extract`` (``make features``): a timm backbone over raw-image splits → SCAN precomp files.

The backbone, its weights and the image pipeline come from an experiment, so the features are
exactly what that experiment's grid (or ViT token) encoder sees on the fly (evaluation view,
frozen BN):

    make features EXP=demo_grid                      # the demo images, tiny random backbone
    make features EXP=f30k_wsl                       # WSL ResNeXt-101 at 512 px (paper)
    make features EXP=f30k_wsl model.visual.backbone=convnext_base.fb_in22k extract.pool_grid=6
    make features EXP=f30k_wsl extract.ckpt=logs/…/best.ckpt   # a fine-tuned gpo_lit backbone

Per split it writes ``{split}_ims.npy`` float32 ``(N_images, cells, C)`` (all h·w cells row-major,
or ``pool_grid``² average-pooled cells; with ``model/visual=vit`` the ViT's prefix + patch tokens,
to train on with ``model/visual=vit_precomp``), ``{split}_caps.txt`` and ``{split}_ids.txt`` into
``extract.out_dir``, plus ``features_meta.json``. Rows stream into a memory-mapped
``{split}_ims.partial.npy``, whose disk space is checked and allocated up front (a full disk is one
line naming the file, the space needed and the space free, not a SIGBUS midway);
``{split}_ims.progress.json`` records the rows safely on disk, so a rerun after an interruption
continues where it stopped (with the same settings only: a checkpoint counts by its bytes, so
one replaced under the same path is refused). A finished feature file is never overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gpo_lit.cli import entry_point
from gpo_lit.config_check import check_config
from gpo_lit.config_dict import config_dict
from gpo_lit.encoders.grid import GridEncoder
from gpo_lit.encoders.vit import ViTEncoder
from gpo_lit.errors import GpoLitError, expect, first_line, one_line
from gpo_lit.feature_writer import extract_split, write_json
from gpo_lit.files import require_folder, sha256_of

log = logging.getLogger("gpo_lit.extract")

#: encoders whose backbone set (``grid()``) the extractor stores, and the head config for it
BackboneEncoder = GridEncoder | ViTEncoder
_HEAD_CONFIG = {GridEncoder: "grid_precomp", ViTEncoder: "vit_precomp"}


def build_encoder(cfg: DictConfig) -> BackboneEncoder:
    """The experiment's grid / ViT encoder, or the fine-tuned one of a gpo_lit checkpoint."""
    if cfg.extract.ckpt:
        from gpo_lit.model import load_model

        encoder = load_model(cfg.extract.ckpt)[0].visual_encoder
        source = f"extract.ckpt ({cfg.extract.ckpt})"
    else:
        encoder = instantiate(cfg.model.visual)
        source = "model.visual"
    if not isinstance(encoder, GridEncoder | ViTEncoder):
        raise GpoLitError(
            f"{source}: expected a grid or ViT visual encoder (an experiment with "
            f"model/visual=grid or vit, e.g. EXP=f30k_wsl or demo_grid), found "
            f"{type(encoder).__name__}"
        )
    return encoder


def default_out_dir(cfg: DictConfig, encoder: BackboneEncoder) -> Path:
    """``<data root>/features/<backbone>``, or ``…/<backbone>-ckpt-<hash of its path>`` for a
    fine-tuned checkpoint's backbone (never the folder of the untrained one)."""
    name = encoder.backbone_name
    if cfg.extract.ckpt:
        import hashlib

        digest = hashlib.sha1(str(Path(cfg.extract.ckpt).resolve()).encode()).hexdigest()[:8]
        name += f"-ckpt-{digest}"
    return Path(cfg.data.root) / "features" / name


def read_meta(path: Path) -> dict[str, Any]:
    """An existing ``features_meta.json`` (what :func:`extract` wrote), or one line saying why not."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise GpoLitError(
            f"{path}: expected the JSON record of an earlier extraction, found {first_line(err)}"
        ) from None
    expect(
        isinstance(meta, dict) and isinstance(meta.get("splits", {}), dict),
        path,
        "the JSON record of an earlier extraction (an object with its settings and splits)",
        f"a {type(meta).__name__}" if not isinstance(meta, dict) else "splits that are no object",
    )
    return meta


def launcher_ranks() -> tuple[int, int, int]:
    """``(rank, world, local rank)`` of a torchrun or SLURM launch; ``(0, 1, 0)`` otherwise."""
    for rank, world, local in (
        ("RANK", "WORLD_SIZE", "LOCAL_RANK"),
        ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
    ):
        if int(os.environ.get(world, "1") or 1) > 1:
            env = os.environ
            return int(env.get(rank, 0)), int(env[world]), int(env.get(local, 0) or 0)
    return 0, 1, 0


def ranks_on_this_machine(world: int, launched: bool) -> int:
    """How many of the ``world`` ranks share this machine's cores: under torchrun its
    ``LOCAL_WORLD_SIZE``, under SLURM the tasks per node (``SLURM_NTASKS_PER_NODE``, else the
    first count of ``SLURM_TASKS_PER_NODE`` such as ``4(x2)``); processes spawned here (not
    ``launched``) are all on this machine, and so is a launch that says nothing."""
    if launched:
        env = os.environ
        if env.get("LOCAL_WORLD_SIZE", "").isdigit():
            return max(1, int(env["LOCAL_WORLD_SIZE"]))
        per_node = env.get("SLURM_NTASKS_PER_NODE", "") or env.get("SLURM_TASKS_PER_NODE", "")
        first = per_node.split(",")[0].split("(")[0]
        if "SLURM_PROCID" in env and first.isdigit():
            return max(1, min(world, int(first)))
    return max(1, world)


def rank_threads(world: int, launched: bool) -> int:
    """torch CPU threads per rank when ``world`` ranks extract: this machine's cores divided
    among the ranks on it (at least 1)."""
    return max(1, (os.cpu_count() or 1) // ranks_on_this_machine(world, launched))


def extract(cfg: DictConfig, rank: int | None = None, world: int | None = None) -> dict[str, Path]:
    """Extract every split of ``cfg.extract.splits``; returns ``{split: feature file}``.

    ``extract.devices=N`` spawns N processes here (one per GPU, or CPU processes), each
    extracting its share; under torchrun or SLURM each launched task is one rank instead.
    """
    check_config(cfg)
    ex = cfg.extract
    launched = rank is None
    if rank is None:
        rank, world, local = launcher_ranks()
        if world == 1 and ex.devices > 1:
            return _spawn(cfg, ex.devices)
        expect(
            ex.devices in (1, world),
            "extract.devices",
            f"1 or the launcher's {world} tasks",
            ex.devices,
        )
    else:
        local = rank
    world = world or 1
    if ex.get("num_threads"):
        torch.set_num_threads(ex.num_threads)
    elif world > 1:  # ranks of one machine share its cores
        torch.set_num_threads(rank_threads(world, launched))
    device = ex.device if ex.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and world > 1:
        device = f"cuda:{local}"
    if ex.out_dir:
        require_folder(ex.out_dir, "extract.out_dir")
    if ex.ckpt:  # checked before the demo images are rendered or a split is opened
        from gpo_lit.checkpoint_io import read_checkpoint

        read_checkpoint(ex.ckpt, mmap=True)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # the demo images are rendered on first use
    splits = [datamodule.split(name, ex.max_images) for name in ex.splits]  # data errors first
    torch.manual_seed(cfg.seed)  # random-init backbones (demo) are reproducible
    encoder = build_encoder(cfg)
    out_dir = Path(ex.out_dir) if ex.out_dir else default_out_dir(cfg, encoder)
    reader_cfg = config_dict(cfg.data.reader)
    weights_file = str(ex.ckpt or cfg.model.visual.get("checkpoint_path") or "")
    settings = {
        "backbone": encoder.backbone_name,
        "weights": weights_file
        or ("timm pretrained" if cfg.model.visual.get("pretrained") else "random init"),
        # A file replaced under the same path is other weights: its bytes, not its name, decide.
        **({"weights_sha256": sha256_of(weights_file)} if weights_file else {}),
        "out_index": cfg.model.visual.get("out_index"),
        # ViT token sets: which tokens, before or after the final norm
        **{k: cfg.model.visual[k] for k in ("prefix_tokens", "norm") if k in cfg.model.visual},
        "pool_grid": ex.pool_grid,
        "bf16": bool(ex.bf16),
        "image": {k: v for k, v in reader_cfg.items() if not k.startswith("_")},
        "seed": cfg.seed,
    }
    written: dict[str, Path] = {}
    meta: dict[str, Any] = {**settings, "splits": {}}
    if not ex.out_dir:  # the default folder (a given one is checked above)
        require_folder(out_dir, "extract.out_dir")
    meta_path = out_dir / "features_meta.json"
    if meta_path.exists():  # more splits of the same extraction may join; others may not
        old = read_meta(meta_path)
        meta["splits"] = old.get("splits", {})
        expect(
            {k: v for k, v in old.items() if k != "splits"} == settings,
            meta_path,
            "the settings of this extraction (splits of one folder share them)",
            "features made with other settings; choose another extract.out_dir",
        )
    for name, split in zip(ex.splits, splits, strict=True):
        path = extract_split(
            encoder,
            split,
            out_dir,
            settings=settings,
            pool_grid=ex.pool_grid,
            batch_size=ex.batch_size,
            num_workers=ex.num_workers,
            device=device,
            bf16=ex.bf16,
            flush_every=ex.flush_every,
            progress=ex.progress,
            rank=rank,
            world=world,
            wait_s=ex.rank_wait_s,
        )
        written[name] = path
        if rank != 0:
            continue
        shape = np.load(path, mmap_mode="r").shape
        meta["splits"][name] = {"images": shape[0], "cells": shape[1], "dim": shape[2]}
        print(f"{path}: {shape[0]} images × {shape[1]} cells × {shape[2]}", flush=True)
    if rank != 0:
        return written
    write_json(meta_path, meta)
    dim = meta["splits"][next(iter(written))]["dim"] if written else "C"
    print(
        f"Train on them: make train EXP=<precomputed-feature experiment, e.g. f30k_butd_bert> "
        f"data.root={out_dir} "
        f"model/visual={_HEAD_CONFIG[type(encoder)]} model.visual.in_dim={dim}",
        flush=True,
    )
    return written


def _rank_main(rank: int, cfg: dict, world: int, errors: Any) -> None:
    """One spawned rank: its user errors go to the parent as one line."""
    try:
        extract(OmegaConf.create(cfg), rank=rank, world=world)
    except GpoLitError as err:
        errors.put(f"rank {rank}: {one_line(err)}")
        sys.exit(2)


def _resolved(node: Any) -> Any:
    """``node`` as plain containers for the spawned ranks, resolved where it can be here (a
    ``${hydra:…}`` value outside a Hydra run stays an interpolation the ranks never read)."""
    from omegaconf.errors import InterpolationResolutionError

    try:
        return OmegaConf.to_container(node, resolve=True)
    except InterpolationResolutionError:
        keys = range(len(node)) if OmegaConf.is_list(node) else list(node.keys())
        out = {}
        for k in keys:
            try:
                value = node[k]
            except InterpolationResolutionError:
                out[k] = node._get_node(k)._value()  # the interpolation itself
                continue
            out[k] = _resolved(value) if OmegaConf.is_config(value) else value
        return list(out.values()) if OmegaConf.is_list(node) else out


def _spawn(cfg: DictConfig, n: int) -> dict[str, Path]:
    """Run ``n`` ranks as processes of this machine; the first user error stops all of them."""
    import torch.multiprocessing as mp

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # rendered once, before the ranks start
    for name in cfg.extract.splits:
        datamodule.split(name, cfg.extract.max_images)  # data errors before any process starts
    encoder = build_encoder(cfg)
    out_dir = Path(cfg.extract.out_dir) if cfg.extract.out_dir else default_out_dir(cfg, encoder)
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    try:
        mp.start_processes(
            _rank_main,
            args=(_resolved(cfg), n, errors),
            nprocs=n,
            start_method="spawn",
        )
    except mp.ProcessExitedException:
        if errors.empty():
            raise
        raise GpoLitError(errors.get()) from None
    return {name: out_dir / f"{name}_ims.npy" for name in cfg.extract.splits}


@entry_point("extract")
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
