"""Convert the VSE∞ authors' released checkpoints (REFERENCE §10) into gpo_lit checkpoints.

    python -m gpo_lit.convert model_best.pth out.ckpt --data-root data/f30k/precomp \
        [--vocab f30k_precomp_vocab.json | --bert bert-base-uncased] [--protocols f30k_1k]

The ``.pth`` is read with ``torch.load(weights_only=True)``; the only class it may contain
besides tensors and containers is ``argparse.Namespace`` (the training options), allow-listed
explicitly: nothing else is unpickled. The recipe (pooling, loss, optimiser, evaluation, data
reader) is the matching paper setting composed from ``conf/experiment/`` (:data:`EXPERIMENTS`;
``--experiment`` names another); dimensions are read off the tensors, not the options.
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
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from gpo_lit.checkpoint_io import load_torch_file
from gpo_lit.config_dict import config_dict
from gpo_lit.errors import GpoLitError, expect
from gpo_lit.files import ensure_new

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


# A checkpoint's image encoder (``region``, or the grid backbone's source) and text encoder → its
# paper setting in conf/experiment/, after the data set prefix (f30k_ or coco_, from the options'
# data_name). A grid backbone with another text encoder takes its backbone's setting with the text
# tower swapped (model/text=…; learning-rate multipliers of the absent tower dropped).
EXPERIMENTS = {
    ("region", "bigru"): "butd_bigru",
    ("region", "bert"): "butd_bert",
    ("wsl", "bert"): "wsl",
    ("detector", "bert"): "butd_grid_bert",
    ("imagenet", "bigru"): "resnet152_bigru",
}


def experiment_for(opt: Any, image: str, text_kind: str) -> str:
    """The ``conf/experiment/`` recipe of a checkpoint (see :data:`EXPERIMENTS`); ``image`` is
    ``region`` or the grid backbone's source (``wsl``, ``imagenet``, ``detector``)."""
    data = str(getattr(opt, "data_name", "") or "")
    prefix = "coco" if data.startswith("coco") else "f30k"
    family = image if any(f == image for f, _ in EXPERIMENTS) else "wsl"
    name = EXPERIMENTS.get((family, text_kind))
    if name is None:
        name = next(v for (f, _), v in EXPERIMENTS.items() if f == family)
    return f"{prefix}_{name}"


def compose_recipe(experiment: str, text_kind: str) -> DictConfig:
    """``conf/train.yaml`` composed with ``experiment=<experiment> model/text=<text_kind>``: the
    recipe (encoders, pooling, loss, optimiser, evaluation, data reader) a converted model keeps."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    from gpo_lit.cli import CONF_DIR

    try:
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            return compose("train", [f"experiment={experiment}", f"model/text={text_kind}"])
    except MissingConfigException as err:
        options = ", ".join(err.options or []) or "none"
        raise GpoLitError(
            f"--experiment: expected one of conf/experiment/ ({options}), found {experiment!r}"
        ) from None


def matrix_shape(state: dict[str, Tensor], key: str, where: str) -> tuple[int, int]:
    """The shape of the 2-d tensor ``state[key]`` that a converted model's size is read off."""
    t = state.get(key)
    tower, name = key.split(".", 1)
    expect(
        isinstance(t, Tensor) and t.ndim == 2,
        where,
        f"a 2-d tensor {name} in the {'image' if tower == 'visual_encoder' else 'text'} encoder",
        "none" if t is None else f"one of shape {tuple(t.shape)}",
    )
    assert t is not None  # expect() raised otherwise
    return int(t.shape[0]), int(t.shape[1])


def fit_to_tensors(
    cfg: DictConfig,
    state: dict[str, Tensor],
    text_kind: str,
    bert: str | None,
    grid: dict[str, Any] | None = None,
    where: str = "checkpoint",
) -> None:
    """Set into the composed recipe what the tensors say (dimensions) and what a converted model
    needs (no pretrained weights: every tensor comes from the checkpoint); ``grid``: the
    :class:`GridEncoder` kwargs of a grid checkpoint (backbone, backbone_kwargs, caffe_stride)."""
    embed_dim, in_dim = matrix_shape(state, "visual_encoder.fc.weight", where)
    model = cfg.model
    model.embed_dim = int(embed_dim)
    if grid is not None:
        for key, value in {"pretrained": False, "checkpoint_path": None, **grid}.items():
            model.visual[key] = value
    else:
        has_mlp = "visual_encoder.mlp.layers.0.weight" in state
        model.visual.in_dim = int(in_dim)
        model.visual.residual_mlp = has_mlp
        if has_mlp:
            model.visual.mlp_hidden = int(state["visual_encoder.mlp.layers.0.weight"].shape[0])
    if text_kind == "bert":
        expect(
            bert is not None, "--bert", "the BERT model name or folder the checkpoint used", None
        )
        model.text.encoder.name_or_path = bert
        model.text.encoder.pretrained = False
    else:
        model.text.encoder.word_dim = matrix_shape(state, "text_encoder.embed.weight", where)[1]
    mults = cfg.optim.lr_mults
    if mults:  # a swapped text tower: no multiplier for the one the model lacks
        kept = {p: m for p, m in mults.items() if any(k.startswith(f"{p}.") for k in state)}
        cfg.optim.lr_mults = kept or None


def image_reader(detector: bool, image_size: int | None = None) -> dict[str, Any]:
    """The raw-image reader of a grid checkpoint, as its experiment has it: ImageNet input, or
    the detector's Caffe input (``detector``); ``image_size``: another input side."""
    family = "detector" if detector else "wsl"
    cfg = compose_recipe(f"f30k_{EXPERIMENTS[(family, 'bert')]}", "bert")
    if image_size is not None:
        cfg.data.reader.image_size = int(image_size)
    return config_dict(cfg.data.reader)


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
    image_size: int | None = None,
    experiment: str | None = None,
) -> Path:
    """Write a gpo_lit checkpoint (weights + run config) converted from the authors' ``src``.

    The recipe is ``experiment``'s (default: :func:`experiment_for` the checkpoint), composed
    from ``conf/``, with the dimensions read off the tensors; ``protocols``: the test protocols
    (default ``full``: the whole ``test_split``). Grid checkpoints only: ``backbone`` (timm name;
    default read off the tensors), ``backbone_source`` (``detector`` = BUTD Caffe input and
    stride; default the checkpoint's ``opt.backbone_source``, else ImageNet input),
    ``backbone_kwargs`` (extra ``timm.create_model`` kwargs), ``image_size`` (default the
    experiment's, 512 as in the paper).
    """
    from gpo_lit.data.vocab import Vocabulary
    from gpo_lit.model import VSEModel

    dst = Path(dst)
    ensure_new(dst)
    ckpt = read_authors_checkpoint(src)
    state, text_kind, image_kind = convert_state(ckpt, str(src))
    opt = ckpt.get("opt")
    grid = None
    image = "region"
    if image_kind == "grid":
        image = str(backbone_source or getattr(opt, "backbone_source", None) or "wsl")
        grid = {
            "backbone": backbone or infer_backbone(state, str(src)),
            "backbone_kwargs": backbone_kwargs,
            "caffe_stride": image == "detector",
        }
    experiment = experiment or experiment_for(opt, image, text_kind)
    cfg = compose_recipe(experiment, text_kind)
    fit_to_tensors(cfg, state, text_kind, bert, grid, str(src))
    if image_kind == "grid" and image_size is not None:
        cfg.data.reader.image_size = int(image_size)
    cfg.evaluation.test_protocols = list(protocols or ["full"])
    cfg.data.root = data_root
    cfg.data.test_split = test_split
    hparams = config_dict(cfg.model)
    hparams.pop("_target_", None)
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
        "name": str(cfg.name),
        "experiment": experiment,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
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
    parser.add_argument(
        "--image-size", type=int, help="grid: input side (default: the experiment's, 512)"
    )
    parser.add_argument(
        "--experiment",
        help="the conf/experiment/ recipe to keep (default: the checkpoint's paper setting)",
    )
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
            experiment=args.experiment,
        )
    except GpoLitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}; evaluate with: make eval CKPT={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
