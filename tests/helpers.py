"""Helpers shared by several test modules: the subprocess runner and its one-line-error check,
tiny configs and models, tiny on-disk trees, brute-force metric references. Test modules import
from here (``pythonpath = ["tests"]`` in pyproject), never from one another."""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image

from gpo_lit.cli import CONF_DIR
from gpo_lit.model import VSEModel
from gpo_lit.pooling import valid_mask

ROOT = Path(__file__).resolve().parents[1]
TINY_BACKBONE = "test_resnet.r160_in1k"  # timm's smallest ResNet, random weights
TINY_VIT = "test_vit.r160_in1k"  # patch 16, width 64, 6 blocks, one CLS token


# --- subprocess runs of the entry points ------------------------------------------------------
# The environment of every subprocess the tests start; never mutated (a test that needs more
# passes ``env=`` to ``run``).
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONHASHSEED": "0"}
# What every bench script prints for the machine's load (gpo_lit.threads.load_average).
LOAD_AVERAGE = re.compile(r"load average (\d+\.\d\d ){3}\(1, 5, 15 min\) on \d+ CPUs")


# ENV with the repository root on the path: ``tests.killer`` callbacks load in the subprocess.
TESTS_ENV = {**ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


TINY_DEMO = [
    "++data.demo.n_train=240",
    "++data.demo.n_dev=60",
    "++data.demo.n_test=80",
    "data.batch_size=32",
    "data.eval_batch_size=50",
]


# A 2-epoch run with a step checkpoint every 4 steps (the resume and disk tests): 120 images ×
# 5 captions = 600 pairs / 32 = 18 batches per epoch.
SMALL = [
    "experiment=demo",
    "++data.demo.n_train=120",
    "++data.demo.n_dev=40",
    "++data.demo.n_test=60",
    "data.batch_size=32",
    "data.eval_batch_size=60",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",  # a CSV row every step: a lost or repeated step shows
    "callbacks.last_checkpoint.train_time_interval=null",  # steps instead of minutes
    "callbacks.last_checkpoint.every_n_train_steps=4",
]


TINY_GRID_DEMO = [
    "++data.demo.n_train=120",
    "++data.demo.n_dev=30",
    "++data.demo.n_test=40",
    "data.batch_size=24",
    "data.eval_batch_size=40",
]


# demo_grid with a tiny random ViT instead of the ResNet
VIT_DEMO = (
    "model/visual=vit",
    f"model.visual.backbone={TINY_VIT}",
    "model.visual.pretrained=false",
    "model.visual.backbone_kwargs={img_size: 64}",
    "model.visual.out_index=-1",
    "~model.visual.freeze_bn",
    "data/transforms=backbone",  # mean/std 0.5, bicubic; the demo's 64 px stay
)


def run(
    module: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=ENV if env is None else env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line_error(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, res.stderr[-2000:]
    return errors[0]


# --- in-process runs of the entry points' tasks ---------------------------------------------------
def task_error(
    task: Callable[[Any], Any], cfg: Any, capsys: pytest.CaptureFixture, alone: bool = True
) -> str:
    """Run ``task(cfg)`` (``gpo_lit.train.train``, ``gpo_lit.extract.extract``, …) as its entry point
    does, in this process: exit status 2 and one stderr line ``error: …``, returned. ``alone``: it is
    the only line (else it is the last, after progress bars such as the demo data's)."""
    from gpo_lit.cli import report_errors

    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        report_errors(task)(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    assert not alone or len(lines) == 1, err
    return errors[0].strip()


def train_here(run_dir: Path, *overrides: str) -> dict[str, dict[str, float]]:
    """``gpo_lit.train`` of ``overrides`` in this process, into ``run_dir``; its test metrics
    (also in ``run_dir/metrics.json``)."""
    from gpo_lit.train import train

    cfg = compose_cfg("train", "print_config=false", *overrides, f"paths.output_dir={run_dir}")
    return train(cfg).test


def eval_here(out_dir: Path, *overrides: str) -> dict[str, dict[str, float]]:
    """``gpo_lit.eval`` of ``overrides`` in this process, into ``out_dir``; its metrics (also in
    ``out_dir/metrics.json``)."""
    from gpo_lit.eval import evaluate_checkpoint

    cfg = compose_cfg("eval", "print_config=false", *overrides, f"paths.output_dir={out_dir}")
    return evaluate_checkpoint(cfg)


def untrained_rsum(run_dir: Path, *overrides: str) -> float:
    """Test rsum of the model ``overrides`` train, left at its same-seed initialisation (one batch
    at lr 1e-12: weights move by ~1e-12 at most; lr 0 is refused): the floor a trained model must
    clear. In this process (the trained run may be a subprocess: the same seed, the same start)."""
    results = train_here(
        run_dir,
        *overrides,
        "optim.lr=1e-12",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
    )
    return results["full"]["rsum"]


# --- composed configs and tiny models -----------------------------------------------------------
WORDS = ["<pad>", "<start>", "<end>", "<unk>", "<mask>", "red", "ball"]


def modules_in_eval_mode(module) -> list[str]:
    """Names of the submodules of ``module`` (itself included, as '') in eval mode."""
    return [name for name, m in module.named_modules() if not m.training]


def compose_cfg(name: str, *overrides: str):
    """``conf/<name>.yaml`` composed with ``overrides``, as the command line would."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(name, list(overrides))


def tiny_model(*overrides: str) -> VSEModel:
    cfg = compose_cfg(
        "train",
        "experiment=demo",
        "paths.output_dir=unused",
        "model.embed_dim=8",
        "data.demo.feat_dim=6",
        "model.visual.mlp_hidden=4",
        *overrides,
    )
    return instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=WORDS)


def spread_model(seed: int):
    """A tiny untrained model with N(0, 1) weights: at its small default init every embedding
    points the same way and float32 round-off decides near-ties."""
    torch.manual_seed(seed)
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def save_native(model, path: Path, data_root: Path) -> Path:
    """A gpo_lit checkpoint of ``model`` (as Lightning writes it) whose test split is
    ``data_root``'s ``test``."""
    torch.save(
        {
            "hyper_parameters": dict(model.hparams) | {"vocab": WORDS},
            "state_dict": model.state_dict(),
            "gpo_lit_config": {
                "data": {"root": str(data_root), "test_split": "test", "val_max_images": None}
            },
        },
        path,
    )
    return path


def embed_test_images(model, datamodule) -> torch.Tensor:
    loader = datamodule.test_dataloader()[0]
    with torch.no_grad():
        return torch.cat([model.embed_images(b["img"], b["img_len"]) for b in loader])


def check_round_trip(
    tmp_path: Path,
    end_to_end: tuple[str, ...],
    precomputed: tuple[str, ...],
    cells: int,
    dim: int,
    head: type | None = None,
) -> None:
    """Features of demo_grid (+ ``end_to_end`` overrides) extracted, then embedded by
    demo_grid_features (+ ``precomputed``) with the same head (``head``, default the grid
    encoder): the same embeddings."""
    from gpo_lit.data.formats.precomp import PrecompSplit
    from gpo_lit.encoders.grid import GridCellEncoder, GridEncoder
    from gpo_lit.feature_writer import extract_split
    from gpo_lit.train import build_vocab

    common = (*TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}", "data.eval_batch_size=16")
    cfg = compose_cfg("extract", "experiment=demo_grid", *common, *end_to_end)
    dm_grid = instantiate(cfg.data)
    dm_grid.prepare_data()
    vocab = build_vocab(cfg, dm_grid)
    torch.manual_seed(0)
    grid_model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=vocab).eval()
    dm_grid.set_tokenizer(grid_model.tokenizer)

    out = tmp_path / "feats"
    extract_split(
        grid_model.visual_encoder,
        dm_grid.split("test"),
        out,
        settings={},
        batch_size=7,  # not a divisor of 40: a short last batch
        progress=False,
    )
    back = PrecompSplit(out, "test")
    assert (back.n_images, back.n_regions, back.feat_dim) == (40, cells, dim)
    assert back.captions == dm_grid.split("test").captions
    assert back.image_ids == dm_grid.split("test").image_ids

    pre_cfg = compose_cfg(
        "train", "experiment=demo_grid_features", *common, f"data.root={out}", *precomputed
    )
    dm_pre = instantiate(pre_cfg.data)
    pre_model = instantiate(pre_cfg.model, _recursive_=False, _convert_="all", vocab=vocab).eval()
    assert type(pre_model.visual_encoder) is GridCellEncoder
    assert isinstance(grid_model.visual_encoder, head or GridEncoder)
    # the head (fc) and the pooling of the grid model; the backbone lives in the features
    missing, unexpected = pre_model.visual_encoder.load_state_dict(
        grid_model.visual_encoder.state_dict(), strict=False
    )
    assert not missing and all(k.startswith("backbone.") for k in unexpected)
    pre_model.visual_pool.load_state_dict(grid_model.visual_pool.state_dict())
    dm_pre.set_tokenizer(pre_model.tokenizer)

    on_the_fly = embed_test_images(grid_model, dm_grid)
    from_files = embed_test_images(pre_model, dm_pre)
    assert on_the_fly.shape == (40, 256)
    assert on_the_fly.std(0).mean() > 1e-3  # images embed differently: a row shift would show
    torch.testing.assert_close(from_files, on_the_fly, atol=1e-5, rtol=1e-4)


# --- tiny files and readers ---------------------------------------------------------------------
def scan_file(tmp_path, words, **override):
    """A vocab file as SCAN's serialize_vocab writes it (idx2word keys are strings after JSON)."""
    data = {
        "word2idx": {w: i for i, w in enumerate(words)},
        "idx2word": {str(i): w for i, w in enumerate(words)},
        "idx": len(words),
    }
    data.update(override)
    path = tmp_path / "scan_vocab.json"
    path.write_text(json.dumps(data))
    return path


class OneCaptionSplit:
    """The little of a split reader PairDataset reads: one image, one caption."""

    def __init__(self, caption: str) -> None:
        self.cap2img = np.zeros(1, dtype=np.int64)
        self.n_captions = 1
        self._caption = caption

    def image(self, i: int) -> np.ndarray:
        return np.zeros((2, 3), dtype=np.float32)

    def caption(self, j: int) -> str:
        return self._caption


def make_image_tree(root: Path, n: int = 4, k: int = 5, sub: str = "flickr30k-images") -> Path:
    """A tiny F30K-shaped tree: numeric ids, non-square JPEGs one folder below images/."""
    (root / "precomp").mkdir(parents=True)
    (root / "images" / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    mapping = {}
    for split in ("train", "dev", "test"):
        ids = [str(1000 + 10 * i + len(split)) for i in range(n)]
        (root / "precomp" / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
        caps = [f"a {split} photo number {i} caption {j}" for i in range(n) for j in range(k)]
        (root / "precomp" / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        for i in ids:
            px = rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / "images" / sub / f"{i}.jpg")
            mapping[i] = f"{i}.jpg"
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    return root


def make_precomp_tree(
    root: Path,
    n: int = 4,
    k: int = 5,
    regions: int = 3,
    dim: int = 2,
    split: str = "train",
    ids: bool = True,
    repeated: bool = False,
) -> np.ndarray:
    """Write a tiny precomp split under ``root``; return the unique-image features ``[n, R, D]``."""
    root.mkdir(parents=True, exist_ok=True)
    ims = np.arange(n * regions * dim, dtype=np.float32).reshape(n, regions, dim)
    rows = np.repeat(ims, 5, axis=0) if repeated else ims
    np.save(root / f"{split}_ims.npy", rows)
    caps = [f"caption {j} of image {j // k}" for j in range(n * k)]
    (root / f"{split}_caps.txt").write_text("\n".join(caps) + "\n", encoding="utf-8")
    if ids:
        row_ids = [f"img{r // 5 if repeated else r}" for r in range(len(rows))]
        (root / f"{split}_ids.txt").write_text("\n".join(row_ids) + "\n", encoding="utf-8")
    return ims


METRICS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")


POOL = {
    "gpo": {"name": "gpo", "d_pe": 32, "d_hidden": 32, "temperature": 0.1},
    "max": {"name": "max"},
    "mean": {"name": "mean"},
}


def metrics_for(base: float) -> dict[str, float]:
    """Distinct per-metric numbers: i2t_r1 = base, i2t_r5 = base + 1, ...; rsum their sum."""
    m = {k: base + i for i, k in enumerate(METRICS)}
    m["rsum"] = sum(m.values())
    m.update(i2t_medr=1.0, i2t_meanr=2.0, t2i_medr=1.0, t2i_meanr=3.0)
    return m


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    seed: int,
    pooling: dict,
    visual_pooling: dict | None = None,
    text_pooling: dict | None = None,
    base: float | None = None,
    ckpt: dict | None = None,
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    config = {
        "seed": seed,
        "name": "demo",
        "paths": {"data_dir": "data", "output_dir": "${hydra:runtime.output_dir}"},
        "data": {"root": "${paths.data_dir}/demo", "demo": {"n_regions": 36, "feat_dim": 6}},
        "model": {
            "_target_": "gpo_lit.model.VSEModel",
            "pooling": pooling,
            "visual_pooling": visual_pooling,
            "text_pooling": text_pooling,
            "visual": {"_target_": "gpo_lit.encoders.RegionEncoder"},
            "text": {"encoder": {"_target_": "gpo_lit.encoders.BiGRUTextEncoder"}},
        },
    }
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*overrides, f"seed={seed}"]))
    (job / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    if base is not None:
        results = {"full": metrics_for(base), "other": metrics_for(base - 10)}
        (job / "metrics.json").write_text(json.dumps(results))
    if ckpt is not None:
        (job / "checkpoints").mkdir()
        torch.save(ckpt, job / "checkpoints" / "best-epoch003.ckpt")
    return job


# --- references and stand-ins -------------------------------------------------------------------
def naive_ranks(
    sims: np.ndarray, cap2img: np.ndarray, ties: str = "pessimistic"
) -> tuple[np.ndarray, np.ndarray]:
    """Brute force, one query at a time, from the full matrix sims [n_img, n_cap]: i2t = captions
    of other images scoring ≥ (pessimistic) / > (optimistic) the image's best GT caption; t2i =
    other images scoring ≥ / > the caption's image."""
    against = np.greater_equal if ties == "pessimistic" else np.greater
    n_img, n_cap = sims.shape
    i2t = np.empty(n_img, dtype=np.int64)
    for i in range(n_img):
        best = sims[i, cap2img == i].max()
        i2t[i] = np.count_nonzero(against(sims[i, cap2img != i], best))
    t2i = np.empty(n_cap, dtype=np.int64)
    for j in range(n_cap):
        others = np.arange(n_img) != cap2img[j]
        t2i[j] = np.count_nonzero(against(sims[others, j], sims[cap2img[j], j]))
    return i2t, t2i


def naive_metrics(
    sims: np.ndarray, cap2img: np.ndarray, ties: str = "pessimistic"
) -> dict[str, float]:
    """R@1/5/10, medr, meanr, rsum of ``naive_ranks``, written out independently of
    ``recall_metrics``."""
    out: dict[str, float] = {}
    for name, r in zip(("i2t", "t2i"), naive_ranks(sims, cap2img, ties), strict=True):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * np.count_nonzero(r < k) / len(r)
        out[f"{name}_medr"] = np.floor(np.median(r)) + 1
        out[f"{name}_meanr"] = r.mean() + 1
    out["rsum"] = sum(out[f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10))
    return out


POOLING_CONF = ROOT / "conf" / "model" / "pooling"
B, N, D = 7, 9, 5  # the pooling tests' batch: sets of up to N vectors of dimension D


def make_batch(seed: int = 0, b: int = B, n: int = N, d: int = D, garbage: float = 1e30):
    """Random set with lengths covering 1 and n, padding filled with huge +/- values."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g)
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0], lengths[1] = 1, n
    pad = ~valid_mask(lengths, n)
    signs = torch.randint(0, 2, (b, n, d), generator=g).float() * 2 - 1
    x[pad] = (signs * garbage)[pad]
    return x, lengths


def pe_ref(n: int, d_pe: int) -> torch.Tensor:
    """Sinusoidal rank encodings ``[n, d_pe]`` from the formula, in float64."""
    return torch.tensor(
        [
            [
                math.sin(k * 10000 ** (-j / d_pe))
                if j % 2 == 0
                else math.cos(k * 10000 ** (-(j - 1) / d_pe))
                for j in range(d_pe)
            ]
            for k in range(n)
        ],
        dtype=torch.float64,
    )


class FakeTrainer:
    """The three counters a backbone schedule reads."""

    def __init__(self, epoch: int, n: int, step: int) -> None:
        self.current_epoch, self.num_training_batches, self.global_step = epoch, n, step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a tiny CLIP checkpoint (tests/conftest.py: clip_dir) ----------------------------------------
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
MERGES = [("d", "o"), ("do", "g</w>"), ("c", "a"), ("ca", "t</w>")]


def byte_symbols() -> list[str]:
    """The 256 byte symbols of byte-level BPE, in GPT-2 / CLIP order (printable bytes first)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + k) for k in range(len(rest))]


def clip_vocab(merges: list[tuple[str, str]] = MERGES) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, merges, then start / end."""
    symbols = byte_symbols()
    words = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def word_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges for whole (lower-case ASCII) words: each word's prefixes, left to right, then the
    word with ``</w>``; longer words first, merges words share listed once. A word is one token
    unless an earlier-ranked merge of another word applies inside it first (the demo words: all
    but "above" and "green")."""
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words), key=lambda w: (-len(w), w)):
        for k in range(1, len(word)):
            merges.append((word[:k], word[k] + ("</w>" if k == len(word) - 1 else "")))
    return list(dict.fromkeys(merges))


def save_tiny_clip(root: Path, max_length: int = 12, words: list[str] | None = None) -> Path:
    """Write a tiny seeded CLIP checkpoint (text + vision) and its tokenizer into ``root``, as on
    the Hub; ``max_length``: the tokenizer's limit and the text tower's positions; ``words``: one
    token each (:func:`word_merges`) after the default merges."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    merges = MERGES + word_merges(words or [])
    vocab = clip_vocab(merges)
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length).save_pretrained(root)
    text = {
        "vocab_size": len(vocab),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "projection_dim": 24,
        "bos_token_id": vocab[SOT],
        "eos_token_id": vocab[EOT],
        "pad_token_id": vocab[EOT],
    }
    vision = {"hidden_size": 16, "intermediate_size": 20, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 16}  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(
        CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    ).save_pretrained(root)
    return root


# -- a module with a grid encoder, for backbone schedules ------------------------------------------
class TinyGridModule(torch.nn.Module):
    """What a backbone schedule touches: ``visual_encoder`` (a tiny grid) and ``loss_scale``."""

    def __init__(self) -> None:
        super().__init__()
        from gpo_lit.encoders.grid import GridEncoder

        self.visual_encoder = GridEncoder(TINY_BACKBONE, embed_dim=8, pretrained=False)
        self.loss_scale = 1.0


def compose_train(*overrides: str):
    """``conf/train.yaml`` with ``overrides`` and the hydra node (launcher, sweeper) composed."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)
