"""PCME++'s COCO experiments (REFERENCE §12), checked key by key on the composed configs; their
one-line answers without data or weights; a tiny COCO-shaped tree trained end to end with a tiny
ViT and a tiny CLIP text tower; the freeze-then-ramp schedule and weight averaging they use."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FakeTrainer, TinyGridModule, compose_cfg, one_line_error, run
from PIL import Image

from gpo_lit.callbacks.backbone import BackboneSchedule
from gpo_lit.callbacks.swa import WeightAveraging
from gpo_lit.errors import GpoLitError

# REFERENCE §12, written out here independently of the configs.
TOWERS = {
    "b32": ("vit_base_patch32_clip_quickgelu_224.openai", "openai/clip-vit-base-patch32"),
    "b16": ("vit_base_patch16_clip_quickgelu_224.openai", "openai/clip-vit-base-patch16"),
}
LOSSES = {
    "vse_infty": "gpo_lit.losses.TripletLoss",
    "infonce": "gpo_lit.losses.InfoNCELoss",
    "pcmepp": "gpo_lit.losses.PCMEppLoss",
}
EXPERIMENTS = [f"coco_clip_{t}_{loss}" for t in TOWERS for loss in LOSSES]
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])


def compose(name: str, *overrides: str):
    return compose_cfg(
        "train", f"experiment={name}", "paths.output_dir=unused", "paths.data_dir=data", *overrides
    )


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_clip_experiments_follow_pcmepp_recipe(name: str) -> None:
    tower, loss = name.split("_")[2], "_".join(name.split("_")[3:])
    cfg = compose(name)
    assert cfg.name == name
    # data: COCO raw images, 224 px, crop side ratio U[0.6, 1), flip 0.5, ImageNet mean/std
    # (the release's quirk), batch 128, validation on 1,000 dev images, caption augmentation per
    # BPE token at 0.2 (half masked, a tenth random, the rest deleted)
    d = cfg.data
    assert (d.root, d.train_split, d.val_split, d.test_split) == (
        "data/coco",
        "train",
        "dev",
        "testall",
    )
    assert d.reader._target_ == "gpo_lit.data.formats.images.ImageSplit"
    assert (d.reader.image_size, d.reader.crop_min_ratio, d.reader.hflip_p) == (224, 0.6, 0.5)
    assert (list(d.reader.mean), list(d.reader.std)) == IMAGENET
    assert (d.batch_size, d.val_max_images) == (128, 1000)
    a = d.augment
    assert (a.word_prob, a.word_mask_prob, a.word_random_prob, a.per_token) == (0.2, 0.5, 0.1, True)
    assert a.region_keep_prob is None and d.noise_ratio == 0.0
    # towers: every image token before the final norm, CLIP text tower, Linear → GPO, d = 1024
    m = cfg.model
    backbone, text = TOWERS[tower]
    assert m.embed_dim == 1024
    assert m.visual._target_ == "gpo_lit.encoders.ViTEncoder"
    assert (m.visual.backbone, m.visual.pretrained) == (backbone, True)
    assert (m.visual.prefix_tokens, m.visual.norm, m.visual.out_index) == (True, False, -1)
    assert (m.visual.size_augment, m.visual.xavier_init) == (True, True)
    assert m.text.encoder._target_ == "gpo_lit.encoders.HFTextEncoder"
    assert (m.text.encoder.name_or_path, m.text.encoder.pretrained) == (text, True)
    assert m.text.tokenizer.max_length is None and m.text.tokenizer.mask_token == "M"  # 77 tokens
    assert m.pooling.name == "gpo" and m.visual_pooling is None and m.text_pooling is None
    assert m.uncertainty_pooling.name == "gpo"
    # optimisation: AdamP 5e-4, wd 1e-4 (none on the loss's scalars), ×0.1 from epoch 15 of 25,
    # clip 2.0, fp32; image tower ×0.01, text ×0.1, layer-wise decay 0.7 in both towers
    o = cfg.optim
    assert o.optimizer._target_ == "adamp.AdamP"
    assert (o.lr, o.weight_decay, list(o.no_weight_decay)) == (5e-4, 1e-4, ["loss_fn"])
    assert (list(o.decay_epochs), o.decay_gamma) == ([15], 0.1)
    assert dict(o.lr_mults) == {"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1}
    assert o.layer_decay.factor == 0.7
    assert list(o.layer_decay.towers) == ["visual_encoder.backbone", "text_encoder.bert"]
    assert o.layer_decay.get("num_blocks") is None  # counted: 12 in every B tower, as released
    t = cfg.trainer
    assert (t.max_epochs, t.gradient_clip_val, t.precision) == (25, 2.0, "32-true")
    # image tower frozen in epochs 0–1, the loss ramped (i + 1) / n over epoch 2; text never frozen
    s = cfg.callbacks.backbone_schedule
    assert s._target_ == "gpo_lit.callbacks.BackboneSchedule"
    assert (s.module, s.freeze_epochs, s.stages, s.warmup, s.warmup_offset) == (
        "visual_encoder.backbone",
        2,
        None,
        True,
        1,
    )
    assert set(cfg.callbacks) == {
        "model_checkpoint",
        "last_checkpoint",
        "lr_monitor",
        "backbone_schedule",
    }  # SWA is an option
    # the paper's evaluation: COCO 1K / 5K, ECCV Caption, CxC
    assert list(cfg.evaluation.test_protocols) == ["coco_1k", "coco_5k", "eccv", "cxc"]
    # losses
    lo = cfg.loss
    assert lo._target_ == LOSSES[loss] and lo.gather is True
    if loss == "vse_infty":
        assert (lo.margin, lo.all_negatives_epochs, lo.mask_same_image) == (0.2, 2, False)
    elif loss == "infonce":
        assert (lo.scale, lo.init_scale, lo.max_scale, lo.learnable) == ("linear", 1.0, None, True)
    else:
        assert (lo.uncertainty, lo.init_negative_scale, lo.init_shift) == (True, 5.0, 5.0)
        assert (lo.pseudo_positive, lo.kl_weight, lo.test_similarity) == (0.1, 1e-4, "csd")
        assert lo.pseudo_positive_start_epoch == 0  # released: from the first step
        mix = lo.mixing
        assert (mix.p, mix.cutmix_prob, mix.alpha) == (0.25, 0.5, 2.0)
    if loss != "pcmepp":
        assert lo.get("mixing") is None


def test_swa_option_averages_epochs_16_to_24() -> None:
    cfg = compose("coco_clip_b32_pcmepp", "callbacks=[default,swa]")
    swa = cfg.callbacks.swa
    assert swa._target_ == "gpo_lit.callbacks.WeightAveraging"
    assert (swa.start_epoch, swa.every_n_epochs) == (16, 1)
    assert "backbone_schedule" in cfg.callbacks  # the experiment's schedule stays
    cb = WeightAveraging(swa.start_epoch, swa.every_n_epochs)
    assert [e for e in range(cfg.trainer.max_epochs) if cb.averages(e)] == list(range(16, 25))


def test_loss_sweep_composes_every_loss_on_the_clip_experiments() -> None:
    for loss, target in [("triplet_clip", LOSSES["vse_infty"]), *list(LOSSES.items())[1:]]:
        for exp in ("coco_clip_b32_vse_infty", "coco_clip_b16_infonce", "demo_clip"):
            cfg = compose(exp, f"loss={loss}")
            assert cfg.loss._target_ == target
            assert ("all_negatives_epochs" in cfg.loss) == (loss == "triplet_clip")


def test_freeze_then_ramp_is_i_plus_one_over_n() -> None:
    m = TinyGridModule()
    sched = BackboneSchedule(freeze_epochs=2, warmup=True, warmup_offset=1)
    bb = m.visual_encoder.backbone
    for epoch in (0, 1):
        sched.on_train_epoch_start(FakeTrainer(epoch, 4, 4 * epoch), m)
        assert not any(p.requires_grad for p in bb.parameters())
        sched.on_train_batch_start(FakeTrainer(epoch, 4, 4 * epoch + 1), m, None, 1)
        assert m.loss_scale == 1.0
    sched.on_train_epoch_start(FakeTrainer(2, 4, 8), m)
    assert all(p.requires_grad for p in bb.parameters())
    scales = []
    for i in range(4):
        sched.on_train_batch_start(FakeTrainer(2, 4, 8 + i), m, None, i)
        scales.append(m.loss_scale)
    assert scales == [0.25, 0.5, 0.75, 1.0]  # PCME++: (batch_idx + 1) / n
    sched.on_train_batch_start(FakeTrainer(3, 4, 12), m, None, 0)
    assert m.loss_scale == 1.0
    with pytest.raises(GpoLitError, match="warmup_offset"):
        BackboneSchedule(warmup_offset=2)


def test_weight_averaging_is_the_mean_of_the_epochs_weights() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    cb = WeightAveraging(start_epoch=2, every_n_epochs=2)
    snapshots = []
    for epoch in range(7):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        if epoch in (2, 4, 6):
            snapshots.append({k: v.clone() for k, v in net.state_dict().items()})
        if cb.averages(epoch):
            cb.update(net, epoch)
    assert cb.averaged_epochs == [2, 4, 6]
    avg = cb.averaged_state_dict(net)
    for k in avg:
        expected = sum(s[k].double() for s in snapshots) / 3
        assert torch.allclose(avg[k].double(), expected, atol=1e-6), k
    # the running mean survives a resume
    other = WeightAveraging(start_epoch=2, every_n_epochs=2)
    other.load_state_dict(cb.state_dict())
    assert other.n_averaged == 3 and torch.equal(other.mean["0.weight"], cb.mean["0.weight"])
    with pytest.raises(GpoLitError, match="every_n_epochs"):
        WeightAveraging(every_n_epochs=0)


# -- end to end ---------------------------------------------------------------------------------
def make_coco_tree(root: Path, n: int = 6, k: int = 5) -> Path:
    """A tiny COCO-shaped raw-image tree: precomp/{train,dev,testall}_{ids,caps}.txt, COCO file
    names under images/train2014 and images/val2014, id_mapping.json."""
    rng = np.random.default_rng(0)
    words = ["dog", "cat", "red", "big", "two", "one"]
    mapping = {}
    for s, (split, folder) in enumerate(
        [("train", "train2014"), ("dev", "val2014"), ("testall", "val2014")]
    ):
        (root / "precomp").mkdir(parents=True, exist_ok=True)
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        ids = [str(100000 * (s + 1) + i) for i in range(n)]
        caps = [f"{words[i % 6]} {words[(i + j) % 6]}" for i in range(n) for j in range(k)]
        (root / "precomp" / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
        (root / "precomp" / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        for i in ids:
            name = f"COCO_{folder}_{int(i):012d}.jpg"
            px = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
            Image.fromarray(px).save(root / "images" / folder / name)
            mapping[i] = name
    (root / "id_mapping.json").write_text(json.dumps(mapping))
    return root


TINY_TOWERS = (
    "model.visual.backbone=test_vit.r160_in1k",
    "model.visual.pretrained=false",
    "model.visual.backbone_kwargs={img_size: 64}",
    "model.embed_dim=32",
    "data.reader.image_size=64",
    "data.batch_size=6",
    "data.eval_batch_size=8",
    "data.num_workers=0",
    "evaluation.test_protocols=[full]",
)


def test_missing_coco_names_the_files_and_their_source(tmp_path: Path) -> None:
    res = run(
        "gpo_lit.train",
        "experiment=coco_clip_b32_pcmepp",
        f"paths.data_dir={tmp_path / 'nodata'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    assert "coco/precomp/train_ids.txt" in msg and "id_mapping.json" in msg
    assert "train2014" in msg and "cocodataset.org" in msg


@pytest.mark.slow
def test_missing_clip_weights_name_the_hub_repo(tmp_path: Path) -> None:
    """With the data in place, the absent towers are one line saying what to download."""
    make_coco_tree(tmp_path / "data" / "coco")
    res = run(
        "gpo_lit.train",
        "experiment=coco_clip_b32_pcmepp",
        "evaluation.test_protocols=[full]",
        "data.batch_size=6",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )
    msg = one_line_error(res)
    # the first tower the run needs: CLIP's tokenizer (then its text model, then the ViT)
    assert "openai/clip-vit-base-patch32" in msg and "download" in msg
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


@pytest.mark.slow
def test_coco_clip_pcmepp_trains_on_a_tiny_coco_tree(clip_dir: Path, tmp_path: Path) -> None:
    """The experiment as it is but for tiny towers: 3 epochs (image tower frozen in 0–1, the loss
    ramped in 2), mixing, the σ heads, weight averaging of epochs 1–2 written and evaluable."""
    make_coco_tree(tmp_path / "data" / "coco")
    run_dir = tmp_path / "run"
    res = run(
        "gpo_lit.train",
        "experiment=coco_clip_b32_pcmepp",
        *TINY_TOWERS,
        f"model.text.encoder.name_or_path={clip_dir}",
        "trainer.max_epochs=3",
        "callbacks=[default,swa]",
        "callbacks.swa.start_epoch=1",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 < json.loads((run_dir / "metrics.json").read_text())["full"]["rsum"] <= 600
    swa = run_dir / "checkpoints" / "swa.ckpt"
    averaged = torch.load(swa, map_location="cpu", weights_only=True)["state_dict"]
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert averaged.keys() == last["state_dict"].keys()
    assert any(not torch.equal(v, last["state_dict"][k]) for k, v in averaged.items())
    eval_dir = tmp_path / "eval"
    res = run("gpo_lit.eval", f"ckpt={swa}", f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 < json.loads((eval_dir / "metrics.json").read_text())["full"]["rsum"] <= 600


def test_uncertainty_bias_init_shifts_log_variance() -> None:
    """GPO's weights sum to 1, so the Linear's bias b moves every pooled log σ² by exactly b."""
    from gpo_lit.encoders.uncertainty import UncertaintyHead

    torch.manual_seed(0)
    zero = UncertaintyHead(8, {"name": "gpo"})
    torch.manual_seed(0)
    shifted = UncertaintyHead(8, {"name": "gpo"}, bias_init=-6.0)
    x, lengths = torch.randn(3, 5, 8), torch.tensor([5, 2, 4])
    assert torch.allclose(shifted(x, lengths), zero(x, lengths) - 6.0, atol=1e-5)
    cfg = compose("demo_clip", "loss=pcmepp")
    assert cfg.model.uncertainty_bias_init == -6.0
    assert compose("coco_clip_b32_pcmepp").model.uncertainty_bias_init == 0.0  # as released
