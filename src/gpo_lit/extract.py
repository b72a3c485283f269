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
continues where it stopped (with the same settings only). A finished feature file is never
overwritten.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from gpo_lit.cli import entry_point
from gpo_lit.config_check import check_config
from gpo_lit.config_dict import config_dict
from gpo_lit.encoders.grid import GridEncoder
from gpo_lit.encoders.vit import ViTEncoder
from gpo_lit.errors import GpoLitError, expect
from gpo_lit.files import check_free_space, reserve, write_atomic

log = logging.getLogger("gpo_lit.extract")
_NPY_HEADER = 128  # bytes before the rows in a .npy file of this size (numpy aligns to 64)

#: encoders whose backbone set (``grid()``) the extractor stores, and the head config for it
BackboneEncoder = GridEncoder | ViTEncoder
_HEAD_CONFIG = {GridEncoder: "grid_precomp", ViTEncoder: "vit_precomp"}


class EvalImages(Dataset):
    """Images ``start … n_images−1`` of a raw-image split in their evaluation view."""

    def __init__(self, split: Any, start: int = 0) -> None:
        self.split, self.start = split, start

    def __len__(self) -> int:
        return self.split.n_images - self.start

    def __getitem__(self, k: int) -> torch.Tensor:
        return torch.from_numpy(self.split.image(self.start + k))


def _write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` atomically and on disk (progress records vouch for flushed rows)."""
    write_atomic(path, json.dumps(obj, indent=1).encode(), sync=True)


def _write_lines(path: Path, lines: list[str]) -> None:
    """Write ``lines`` to ``path``, or check that an existing ``path`` holds exactly them."""
    text = "".join(f"{ln}\n" for ln in lines)
    if path.exists():
        expect(
            path.read_text(encoding="utf-8") == text,
            path,
            f"the {len(lines)} lines of the split being extracted (never overwritten)",
            "a different file; remove it or choose another extract.out_dir",
        )
        return
    write_atomic(path, text.encode("utf-8"))


@torch.no_grad()
def extract_split(
    encoder: BackboneEncoder,
    split: Any,
    out_dir: Path,
    *,
    settings: dict[str, Any],
    pool_grid: int | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    bf16: bool = False,
    flush_every: int = 20,
    progress: bool = True,
) -> Path:
    """Write the precomp files of one split; resume an interrupted run with the same ``settings``.

    Args:
        encoder: a grid or ViT encoder (only its backbone runs, in eval mode).
        split: an :class:`~gpo_lit.data.images.ImageSplit` (or any reader with ``image(i)``).
        out_dir: destination folder (created).
        settings: what determines the features (backbone, weights, image pipeline, pooling);
            stored with the progress and in ``features_meta.json``; a resume must match it.
        pool_grid: average-pool the feature map to ``pool_grid × pool_grid`` cells.
        flush_every: flush rows and record progress every this many batches.

    Returns:
        the path of ``{split}_ims.npy``.
    """
    from tqdm.auto import tqdm

    out_dir.mkdir(parents=True, exist_ok=True)
    name = split.split
    final = out_dir / f"{name}_ims.npy"
    partial = out_dir / f"{name}_ims.partial.npy"
    state_path = out_dir / f"{name}_ims.progress.json"
    if final.exists():
        raise GpoLitError(
            f"{final}: expected no feature file (finished features are never overwritten), "
            f"found one; remove it or choose another extract.out_dir"
        )
    encoder.eval().to(device)
    dtype = torch.bfloat16 if bf16 else None

    def cells(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, non_blocking=True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=bf16):
            out = encoder.grid(x, pool_grid)
        return out.float().cpu().numpy()

    probe = cells(torch.from_numpy(split.image(0))[None])
    shape = (split.n_images, *probe.shape[1:])
    key = {"settings": settings, "split": name, "shape": list(shape)}

    start = 0
    # The rows are written through a memory map: space missing on disk would be a SIGBUS later,
    # so it is checked first and then allocated for the whole file (rows × cells × C × 4 bytes).
    size = _NPY_HEADER + 4 * int(np.prod(shape))
    what = f"{shape[0]} images × {shape[1]} cells × {shape[2]} float32 features"
    if partial.exists():
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        expect(
            {k: state.get(k) for k in key} == key,
            partial,
            f"an interrupted extraction with the same settings ({state_path.name}) to resume",
            "other settings or no progress file; remove it to start again",
        )
        check_free_space(partial, size - 512 * partial.stat().st_blocks, f"the rest of {what}")
        reserve(partial, partial.stat().st_size, what)
        mm = np.lib.format.open_memmap(partial, mode="r+")
        start = int(state["done"])
        log.info("%s: resuming at image %d of %d", partial, start, shape[0])
    else:
        check_free_space(partial, size, what)
        mm = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        try:
            reserve(partial, os.path.getsize(partial), what)
        except BaseException:
            del mm
            partial.unlink()  # made just now, holds nothing
            raise
        _write_json(state_path, {**key, "done": 0})

    loader = DataLoader(
        EvalImages(split, start),
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
    )
    row = start
    bar = tqdm(
        total=shape[0], initial=start, unit="img", desc=f"{name} features", disable=not progress
    )
    for b, images in enumerate(loader, 1):
        feats = cells(images)
        mm[row : row + len(feats)] = feats
        row += len(feats)
        bar.update(len(feats))
        if b % flush_every == 0:
            mm.flush()  # rows on disk before the progress file says so
            _write_json(state_path, {**key, "done": row})
    bar.close()
    mm.flush()
    del mm
    expect(row == shape[0], partial, f"{shape[0]} rows written", row)
    _write_lines(out_dir / f"{name}_caps.txt", list(split.captions))
    if split.image_ids is not None:
        _write_lines(out_dir / f"{name}_ids.txt", list(split.image_ids))
    os.replace(partial, final)
    state_path.unlink()
    return final


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


def extract(cfg: DictConfig) -> dict[str, Path]:
    """Extract every split of ``cfg.extract.splits``; returns ``{split: feature file}``."""
    check_config(cfg)
    ex = cfg.extract
    if ex.get("num_threads"):
        torch.set_num_threads(ex.num_threads)
    device = ex.device if ex.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
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
    settings = {
        "backbone": encoder.backbone_name,
        "weights": str(ex.ckpt or cfg.model.visual.get("checkpoint_path") or "")
        or ("timm pretrained" if cfg.model.visual.get("pretrained") else "random init"),
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
    meta_path = out_dir / "features_meta.json"
    if meta_path.exists():  # more splits of the same extraction may join; others may not
        old = json.loads(meta_path.read_text())
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
        )
        shape = np.load(path, mmap_mode="r").shape
        meta["splits"][name] = {"images": shape[0], "cells": shape[1], "dim": shape[2]}
        written[name] = path
        print(f"{path}: {shape[0]} images × {shape[1]} cells × {shape[2]}", flush=True)
    _write_json(meta_path, meta)
    dim = meta["splits"][next(iter(written))]["dim"] if written else "C"
    print(
        f"Train on them: make train EXP=<precomputed-feature experiment, e.g. f30k_butd_bert> "
        f"data.root={out_dir} "
        f"model/visual={_HEAD_CONFIG[type(encoder)]} model.visual.in_dim={dim}",
        flush=True,
    )
    return written


@entry_point("extract")
def main(cfg: DictConfig) -> None:
    extract(cfg)


if __name__ == "__main__":
    main()
