"""Every image-text row of the paper's results table (REFERENCE §8) is an experiment with the
released recipe (REFERENCE §2–§5): checked key by key on the composed configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import WORDS, compose_cfg, modules_in_eval_mode
from hydra.utils import instantiate
from torch import nn

from gpo_lit.cli import CONF_DIR

CONF = Path(CONF_DIR)

GRID = "gpo_lit.encoders.grid.GridEncoder"
REGION = "gpo_lit.encoders.RegionEncoder"
BERT = "gpo_lit.encoders.HFTextEncoder"
BIGRU = "gpo_lit.encoders.BiGRUTextEncoder"
WSL = "resnext101_32x8d.fb_wsl_ig1b_ft_in1k"

# experiment: (data set, visual, backbone, text, weight decay, lr multipliers)
ROWS = {
    "f30k_butd_bigru": ("f30k", REGION, None, BIGRU, 1e-2, None),
    "coco_butd_bigru": ("coco", REGION, None, BIGRU, 1e-2, None),
    "f30k_butd_bert": ("f30k", REGION, None, BERT, 1e-4, {"text_encoder.bert": 0.1}),
    "coco_butd_bert": ("coco", REGION, None, BERT, 1e-4, {"text_encoder.bert": 0.1}),
    "f30k_butd_grid_bert": (
        "f30k",
        GRID,
        "resnet101",
        BERT,
        1e-4,
        {"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1},
    ),
    "coco_butd_grid_bert": (
        "coco",
        GRID,
        "resnet101",
        BERT,
        1e-4,
        {"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1},
    ),
    "f30k_wsl": (
        "f30k",
        GRID,
        WSL,
        BERT,
        1e-4,
        {"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1},
    ),
    "coco_wsl": (
        "coco",
        GRID,
        WSL,
        BERT,
        1e-4,
        {"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1},
    ),
    "f30k_resnet152_bigru": (
        "f30k",
        GRID,
        "resnet152.tv_in1k",
        BIGRU,
        1e-4,
        {"visual_encoder.backbone": 0.1},
    ),
    "coco_resnet152_bigru": (
        "coco",
        GRID,
        "resnet152.tv_in1k",
        BIGRU,
        1e-4,
        {"visual_encoder.backbone": 0.1},
    ),
}


@pytest.mark.parametrize("name", sorted(ROWS))
def test_paper_rows_use_the_released_recipe(name: str) -> None:
    dataset, visual, backbone, text, wd, mults = ROWS[name]
    cfg = compose_cfg(
        "train", f"experiment={name}", "paths.output_dir=unused", "paths.data_dir=data"
    )
    assert cfg.name == name
    # data: the data set's splits and protocols (COCO 1K is the 5-fold mean of testall)
    assert cfg.data.root == f"data/{dataset}" + ("/precomp" if visual == REGION else "")
    assert (cfg.data.test_split, list(cfg.evaluation.test_protocols)) == (
        ("test", ["f30k_1k"]) if dataset == "f30k" else ("testall", ["coco_1k", "coco_5k"])
    )
    assert cfg.data.val_max_images == 1000 and cfg.data.batch_size == 128
    # model: d = 1024, GPO on both sides, the paper's encoders
    assert cfg.model.embed_dim == 1024 and cfg.model.pooling.name == "gpo"
    assert cfg.model.visual._target_ == visual and cfg.model.text.encoder._target_ == text
    if text == BERT:
        assert cfg.model.text.encoder.name_or_path == "bert-base-uncased"
    # caption augmentation as the released code for the text encoder: the BiGRU vocabulary's
    # <start>/<end> are perturbed like words, BERT's [CLS]/[SEP] are not (tests/test_text.py)
    assert cfg.data.augment.perturb_specials is None
    assert cfg.model.text.tokenizer.kind == ("hf" if text == BERT else "vocab")
    # optimisation: AdamW 5e-4, ×0.1 at epoch 15 of 25, clip 2.0, margin 0.2, warm-up epoch 0
    assert (cfg.optim.lr, cfg.optim.weight_decay) == (5e-4, wd)
    assert (list(cfg.optim.decay_epochs), cfg.optim.decay_gamma) == ([15], 0.1)
    assert dict(cfg.optim.lr_mults or {}) == (mults or {})
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val) == (25, 2.0)
    assert (cfg.loss.margin, cfg.loss.all_negatives_epochs) == (0.2, 1)
    if visual == REGION:
        assert cfg.model.visual.in_dim == 2048 and cfg.data.augment.region_keep_prob == 0.8
        return
    # grid models: 512 px, frozen BN, size augmentation, backbone frozen in epoch 0 then whole,
    # with the loss warm-up; Caffe input and stride only for the detector backbone
    v = cfg.model.visual
    assert (v.backbone, v.freeze_bn, v.size_augment, v.out_index) == (backbone, True, True, -1)
    assert cfg.data.reader.image_size == 512 and cfg.data.reader.crop_min_ratio == 0.6
    sched = cfg.callbacks.backbone_schedule
    assert (sched.freeze_epochs, sched.stages, sched.warmup) == (1, None, True)
    detector = backbone == "resnet101"
    assert v.caffe_stride == detector and v.pretrained == (not detector)
    assert cfg.data.reader.get("bgr", False) == detector
    if detector:
        assert list(cfg.data.reader.mean) == [102.9801, 115.9465, 122.7717]


BIGRU_EXPERIMENTS = sorted(
    p.stem
    for pattern in ("*bigru*.yaml", "demo*.yaml")
    for p in (CONF / "experiment").glob(pattern)
)


@pytest.mark.parametrize("name", BIGRU_EXPERIMENTS)
def test_bigru_experiments_perturb_start_and_end(name: str) -> None:
    """Every BiGRU recipe and demo uses the word vocabulary with the released augmentation, which
    perturbs <start>/<end> like words (perturb_specials=null resolves to that for the vocabulary
    tokenizer, tests/test_text.py)."""
    cfg = compose_cfg("train", f"experiment={name}", "paths.output_dir=unused")
    assert cfg.model.text.tokenizer.kind == "vocab"
    assert cfg.data.augment.perturb_specials is None and cfg.data.augment.word_prob == 0.2


@pytest.mark.parametrize(
    "experiment",
    ["demo", "demo_grid", "demo_grid_features", "demo_video", "demo_clip", "demo_shards"],
)
def test_every_module_is_built_in_train_mode(experiment: str) -> None:
    """Lightning trains every module in the mode it was built in (it never calls ``train()``):
    only what an encoder freezes on purpose, a frozen backbone's BatchNorm, may be built in eval
    mode (a tower loaded by ``from_pretrained`` arrives in eval mode, dropout off)."""
    cfg = compose_cfg("train", f"experiment={experiment}", "paths.output_dir=unused")
    words = WORDS if cfg.model.text.tokenizer.get("kind") == "vocab" else None
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=words)
    frozen_bn = getattr(model.visual_encoder, "freeze_bn", False)
    in_eval = modules_in_eval_mode(model)
    assert all(
        frozen_bn and isinstance(model.get_submodule(name), nn.modules.batchnorm._BatchNorm)
        for name in in_eval
    ), in_eval
