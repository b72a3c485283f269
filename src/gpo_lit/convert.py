"""Convert the VSE∞ authors' released checkpoints (REFERENCE §10) into gpo_lit checkpoints.

    python -m gpo_lit.convert model_best.pth out.ckpt --data-root data/f30k/precomp \
        [--vocab f30k_precomp_vocab.json | --bert bert-base-uncased] [--protocols f30k_1k]

The ``.pth`` is read with ``torch.load(weights_only=True)``; the only class it may contain
besides tensors and containers is ``argparse.Namespace`` (the training options), allow-listed
explicitly: nothing else is unpickled. Dimensions are read off the tensors, not the options.
Region (+ BiGRU / BERT) and grid (+ BERT / BiGRU) checkpoints are supported. A grid checkpoint
names no timm model: the architecture is read off the tensors (ResNet-50/101/152, ResNeXt-32×Nd)
or given with ``--backbone``; ``--backbone-source detector`` (or the options' ``backbone_source``)
selects the BUTD detector's Caffe input and stride, and ``--data-root`` is then a raw-image root
(``precomp/``, ``id_mapping.json``, ``images/``):

    python -m gpo_lit.convert model_best.pth out.ckpt --data-root data/f30k --bert bert-base-uncased
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpo_lit.checkpoint_io import load_torch_file
from gpo_lit.errors import GpoLitError, expect

# authors' prefix (per encoder) → gpo_lit prefix
IMAGE_KEYS = {"fc.": "visual_encoder.fc.", "mlp.": "visual_encoder.mlp.", "gpool.": "visual_pool."}
BIGRU_KEYS = {"embed.": "text_encoder.embed.", "rnn.": "text_encoder.rnn.", "gpool.": "text_pool."}
BERT_KEYS = {
    "bert.": "text_encoder.bert.",
    "linear.": "text_encoder.linear.",
    "gpool.": "text_pool.",
}
# The authors' grid image encoder: the backbone as a torchvision ResNet, repeated as base/top.
GRID_KEYS = {
    "backbone.resnet.": "visual_encoder.backbone.",
    "image_encoder.fc.": "visual_encoder.fc.",
    "image_encoder.gpool.": "visual_pool.",
}
# backbone.base.i / backbone.top. are the same tensors as these torchvision modules
BASE_MODULES = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3"}
BLOCKS_TO_DEPTH = {6: 50, 23: 101, 36: 152}  # blocks in layer3
# Present in the authors' BERT state but unused by VSE∞ (all tokens are pooled) or rebuilt.
DROPPED = ("text_encoder.bert.pooler.", "text_encoder.bert.embeddings.position_ids")


def read_authors_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load the authors' ``.pth`` without unpickling anything but tensors and ``Namespace``."""
    path = Path(path)
    expect(path.is_file(), path, "the authors' checkpoint file", "no such file")
    ckpt = load_torch_file(
        path,
        "a VSE∞ checkpoint holding only tensors and the options Namespace",
        safe_globals=[argparse.Namespace],
    )
    expect(
        isinstance(ckpt, dict) and "model" in ckpt,
        path,
        "a dict with a 'model' entry",
        type(ckpt).__name__,
    )
    model = ckpt["model"]
    expect(
        isinstance(model, (list, tuple)) and len(model) == 2,
        f"{path} ['model']",
        "[image_encoder_state_dict, text_encoder_state_dict]",
        f"{type(model).__name__} of length {len(model) if hasattr(model, '__len__') else '?'}",
    )
    return ckpt


def _strip_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix DataParallel adds (the BERT releases)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _rename(state: dict[str, Tensor], table: dict[str, str], where: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is None:
            raise GpoLitError(
                f"{where}: expected keys starting with {sorted(table)}, found '{key}'"
            )
        out[table[prefix] + key[len(prefix) :]] = value
    return out


def grid_image_state(img_state: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """The authors' grid image encoder → gpo_lit keys; checks that ``backbone.base`` / ``top``
    repeat ``backbone.resnet`` (the classifier ``fc`` is dropped)."""
    resnet = {
        k[len("backbone.resnet.") :]: v
        for k, v in img_state.items()
        if k.startswith("backbone.resnet.")
    }
    expect(bool(resnet), where, "backbone.resnet.* tensors (a grid image encoder)", "none")
    for key, value in img_state.items():
        if key.startswith("backbone.base."):
            index, rest = key[len("backbone.base.") :].split(".", 1)
            twin = f"{BASE_MODULES.get(index, '?')}.{rest}"
        elif key.startswith("backbone.top."):
            twin = "layer4." + key[len("backbone.top.") :]
        else:
            continue
        if twin not in resnet or not torch.equal(resnet[twin], value):
            raise GpoLitError(
                f"{where}: expected {key} to repeat backbone.resnet.{twin}, found "
                + ("no such tensor" if twin not in resnet else "other values")
            )
    kept = {
        k: v
        for k, v in img_state.items()
        if not k.startswith(("backbone.base.", "backbone.top.", "backbone.resnet.fc."))
    }
    return _rename(kept, GRID_KEYS, where)


def infer_backbone(state: dict[str, Tensor], where: str) -> str:
    """The timm architecture of a torchvision-style ResNet / ResNeXt backbone state."""
    pre = "visual_encoder.backbone."
    blocks = {k[len(pre) :].split(".")[1] for k in state if k.startswith(pre + "layer3.")}
    depth = BLOCKS_TO_DEPTH.get(len(blocks))
    conv2 = state.get(pre + "layer1.0.conv2.weight")
    if depth is None or conv2 is None:
        raise GpoLitError(
            f"{where}: expected a ResNet/ResNeXt-50/101/152 backbone ({sorted(BLOCKS_TO_DEPTH)} "
            f"blocks in layer3), found {len(blocks)}; name it with --backbone"
        )
    width, per_group = conv2.shape[0], conv2.shape[1]
    groups = width // per_group
    if groups == 1:
        return f"resnet{depth}"
    return f"resnext{depth}_{groups}x{per_group}d"


def convert_state(ckpt: dict[str, Any], where: str) -> tuple[dict[str, Tensor], str, str]:
    """The gpo_lit state dict, the text encoder kind (``bigru``/``bert``) and the image encoder
    kind (``region``/``grid``)."""
    img_state, txt_state = (_strip_module(s) for s in ckpt["model"])
    grid = any(k.startswith(("backbone.", "image_encoder.")) for k in img_state)
    text_kind = "bert" if any(k.startswith("bert.") for k in txt_state) else "bigru"
    if grid:
        state = grid_image_state(img_state, f"{where} image encoder")
    else:
        state = _rename(img_state, IMAGE_KEYS, f"{where} image encoder")
    table = BERT_KEYS if text_kind == "bert" else BIGRU_KEYS
    state |= _rename(txt_state, table, f"{where} text encoder")
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    return state, text_kind, "grid" if grid else "region"


def model_config(
    state: dict[str, Tensor],
    text_kind: str,
    bert: str | None,
    grid: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``VSEModel`` kwargs matching the tensors' shapes (the paper's recipe otherwise); ``grid``:
    the :class:`GridEncoder` kwargs of a grid checkpoint (backbone, backbone_kwargs, ...)."""
    embed_dim, in_dim = state["visual_encoder.fc.weight"].shape
    if grid is not None:
        visual = {
            "_target_": "gpo_lit.encoders.grid.GridEncoder",
            "embed_dim": int(embed_dim),
            "pretrained": False,  # every backbone tensor comes from the checkpoint
            **grid,
        }
    else:
        has_mlp = "visual_encoder.mlp.layers.0.weight" in state
        hidden = state["visual_encoder.mlp.layers.0.weight"].shape[0] if has_mlp else 512
        visual = {
            "_target_": "gpo_lit.encoders.RegionEncoder",
            "in_dim": int(in_dim),
            "embed_dim": int(embed_dim),
            "mlp_hidden": int(hidden),
            "residual_mlp": has_mlp,
        }
    if text_kind == "bert":
        expect(
            bert is not None, "--bert", "the BERT model name or folder the checkpoint used", None
        )
        text = {
            "encoder": {
                "_target_": "gpo_lit.encoders.HFTextEncoder",
                "name_or_path": bert,
                "embed_dim": int(embed_dim),
                "pretrained": False,
            },
            "tokenizer": {"kind": "hf", "name_or_path": bert, "max_length": 128},
        }
    else:
        vocab_size, word_dim = state["text_encoder.embed.weight"].shape
        text = {
            "encoder": {
                "_target_": "gpo_lit.encoders.BiGRUTextEncoder",
                "word_dim": int(word_dim),
                "embed_dim": int(embed_dim),
                "num_layers": 1,
            },
            "tokenizer": {"kind": "vocab"},
        }
    gpo = {"name": "gpo", "d_pe": 32, "d_hidden": 32, "temperature": 0.1}
    return {
        "visual": visual,
        "text": text,
        "pooling": gpo,
        "embed_dim": int(embed_dim),
        "loss": {
            "_target_": "gpo_lit.losses.TripletLoss",
            "margin": 0.2,
            "all_negatives_epochs": 1,
            "mask_same_image": False,
            "gather": True,
        },
        "optim": {
            "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True},
            "lr": 5e-4,
            "weight_decay": 1e-4,
            "lr_mults": None,
            "layer_decay": None,
            "no_weight_decay": ["loss_fn"],
            "decay_epochs": [15],
            "decay_gamma": 0.1,
            "scheduler": {
                "_target_": "torch.optim.lr_scheduler.MultiStepLR",
                "_partial_": True,
                "milestones": [15],
                "gamma": 0.1,
            },
            "interval": "epoch",
        },
        "evaluation": {
            "val_protocol": "full",
            "test_protocols": ["full"],
            "shard_size": 1024,
            "save_embeddings_to": None,
        },
    }


def image_reader(detector: bool, image_size: int) -> dict[str, Any]:
    """The raw-image reader of a grid checkpoint: ImageNet or the detector's Caffe input."""
    reader: dict[str, Any] = {
        "_target_": "gpo_lit.data.images.ImageSplit",
        "_partial_": True,
        "image_size": image_size,
    }
    if detector:
        from gpo_lit.data.images import CAFFE_MEAN_BGR

        reader |= {"bgr": True, "scale": 255.0, "mean": list(CAFFE_MEAN_BGR), "std": [1.0] * 3}
    return reader


def convert(
    src: str | Path,
    dst: str | Path,
    data_root: str,
    vocab: str | None = None,
    bert: str | None = None,
    test_split: str = "test",
    protocols: list[str] | None = None,
    backbone: str | None = None,
    backbone_source: str | None = None,
    backbone_kwargs: dict[str, Any] | None = None,
    image_size: int = 512,
) -> Path:
    """Write a gpo_lit checkpoint (weights + run config) converted from the authors' ``src``.

    Grid checkpoints only: ``backbone`` (timm name; default read off the tensors),
    ``backbone_source`` (``detector`` = BUTD Caffe input and stride; default the checkpoint's
    ``opt.backbone_source``, else ImageNet input), ``backbone_kwargs`` (extra
    ``timm.create_model`` kwargs), ``image_size`` (512 in the paper).
    """
    from gpo_lit.data.vocab import Vocabulary
    from gpo_lit.model import VSEModel

    dst = Path(dst)
    if dst.exists():
        raise GpoLitError(f"{dst}: expected a new file, found an existing one (not overwritten)")
    ckpt = read_authors_checkpoint(src)
    state, text_kind, image_kind = convert_state(ckpt, str(src))
    grid = None
    data: dict[str, Any] = {}
    if image_kind == "grid":
        source = backbone_source or getattr(ckpt.get("opt"), "backbone_source", None)
        detector = source == "detector"
        grid = {
            "backbone": backbone or infer_backbone(state, str(src)),
            "backbone_kwargs": backbone_kwargs,
            "caffe_stride": detector,
        }
        data["reader"] = image_reader(detector, image_size)
        data["augment"] = {"region_keep_prob": None}
    hparams = model_config(state, text_kind, bert, grid)
    hparams["evaluation"]["test_protocols"] = list(protocols or ["full"])
    words = None
    if text_kind == "bigru":
        expect(
            vocab is not None,
            "--vocab",
            "the vocabulary JSON the checkpoint was trained with",
            None,
        )
        assert vocab is not None  # expect() raised otherwise
        words = Vocabulary.load(vocab).idx2word
        n = state["text_encoder.embed.weight"].shape[0]
        expect(len(words) == n, vocab, f"{n} words (the checkpoint's embedding rows)", len(words))
    try:
        model = VSEModel(**hparams, vocab=words)
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of another shape: the wrong --backbone
        first = (str(err).splitlines() or [""])[-1].strip()[:200]
        raise GpoLitError(
            f"{src}: expected tensors shaped as a {hparams['visual'].get('backbone', 'region')} "
            f"VSE∞ model, found {first}"
        ) from None
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise GpoLitError(
            f"{src}: expected the weights of a {image_kind} + {text_kind} VSE∞ model, found "
            f"missing {sorted(missing)[:4]} and unexpected {sorted(unexpected)[:4]}"
        )
    run_config = {
        "data": {
            "_target_": "gpo_lit.data.datamodule.RetrievalDataModule",
            "root": data_root,
            "test_split": test_split,
            "val_max_images": None,
            "eval_batch_size": 128,
            "num_workers": 0,
            **data,
        },
        "converted_from": str(src),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "hyper_parameters": {**hparams, "vocab": words},
            "state_dict": model.state_dict(),
            "gpo_lit_config": run_config,
        },
        dst,
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpo_lit.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="the authors' .pth checkpoint")
    parser.add_argument("dst", help="the gpo_lit checkpoint to write")
    parser.add_argument(
        "--data-root", required=True, help="precomp folder (region) or raw-image root (grid)"
    )
    parser.add_argument("--vocab", help="vocabulary JSON (BiGRU checkpoints)")
    parser.add_argument("--bert", help="local BERT folder or cached name (BERT checkpoints)")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--protocols", nargs="+", default=["full"])
    parser.add_argument(
        "--backbone", help="grid: timm architecture (default: read off the tensors)"
    )
    parser.add_argument(
        "--backbone-source",
        choices=["wsl", "imagenet", "detector"],
        help="grid: detector = BUTD Caffe input and stride (default: the checkpoint's options)",
    )
    parser.add_argument("--image-size", type=int, default=512, help="grid: input side")
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.src,
            args.dst,
            args.data_root,
            args.vocab,
            args.bert,
            args.test_split,
            args.protocols,
            backbone=args.backbone,
            backbone_source=args.backbone_source,
            image_size=args.image_size,
        )
    except GpoLitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}; evaluate with: make eval CKPT={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
