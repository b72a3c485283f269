"""ViT / CLIP image towers as token sets (REFERENCE §12): the tokens timm's
``forward_intermediates`` gives, the Xavier head, token dropping, weights from local files only,
the backbone's own image settings, and block-wise schedules."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import (
    TINY_GRID_DEMO,
    TINY_VIT,
    VIT_DEMO,
    WORDS,
    FakeTrainer,
    check_round_trip,
    compose_cfg,
    make_image_tree,
)

from gpo_lit.callbacks.backbone import BackboneSchedule
from gpo_lit.encoders.vit import ViTEncoder
from gpo_lit.errors import GpoLitError, user_error

TINY = TINY_VIT
KW = {"img_size": 64}  # 4 × 4 = 16 patches


def vit(backbone: str = TINY, seed: int = 0, **kwargs) -> ViTEncoder:
    torch.manual_seed(seed)
    kwargs.setdefault("backbone_kwargs", KW)
    return ViTEncoder(backbone, embed_dim=8, pretrained=False, **kwargs).eval()


def reference(enc: ViTEncoder, backbone: str, backbone_kwargs: dict) -> torch.nn.Module:
    """An unpruned timm model of the same architecture holding the encoder's weights."""
    ref = timm.create_model(backbone, pretrained=False, num_classes=0, **backbone_kwargs).eval()
    missing, unexpected = ref.load_state_dict(enc.backbone.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("norm.", "blocks.", "attn_pool.")) for k in missing)
    return ref


@pytest.mark.parametrize(
    ("backbone", "kwargs", "n_prefix"),
    [
        (TINY, KW, 1),  # CLS
        (  # DINOv2 with registers: CLS + 4 registers
            "vit_small_patch14_reg4_dinov2",
            {"img_size": 56, "depth": 2, "embed_dim": 32, "num_heads": 2},
            5,
        ),
        (  # SigLIP: no prefix token at all (its attention-pooling head is removed)
            "vit_base_patch16_siglip_224",
            {"img_size": 64, "depth": 2, "embed_dim": 32, "num_heads": 2},
            0,
        ),
    ],
)
def test_tokens_are_prefix_then_patches_before_the_final_norm(backbone, kwargs, n_prefix) -> None:
    enc = vit(backbone, backbone_kwargs=kwargs)
    ref = reference(enc, backbone, kwargs)
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    n_patches = math.prod(ref.patch_embed.grid_size)
    assert n_patches == 16
    with torch.no_grad():
        tokens = enc.grid(x)
        # the whole sequence after the last block, before the final LayerNorm
        seq = ref.blocks(ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x)))))
        out, lengths = enc(x)
    assert tokens.shape == (2, n_prefix + n_patches, ref.embed_dim)
    torch.testing.assert_close(tokens, seq)
    torch.testing.assert_close(out, enc.fc(tokens))
    assert lengths.tolist() == [n_prefix + n_patches] * 2
    assert enc.num_prefix_tokens == n_prefix
    if n_prefix:
        without = vit(backbone, backbone_kwargs=kwargs, prefix_tokens=False)
        with torch.no_grad():
            torch.testing.assert_close(without.grid(x), seq[:, n_prefix:])


def test_norm_option_and_out_index_prune_the_model() -> None:
    x = torch.randn(2, 3, 64, 64)
    enc = vit()
    ref = reference(enc, TINY, KW)
    assert not any(
        n.startswith(("norm.", "head.", "fc_norm.")) for n, _ in enc.backbone.named_parameters()
    )
    normed = vit(norm=True)
    early = vit(out_index=-3)
    assert len(early.backbone.blocks) == 4 and len(enc.backbone.blocks) == 6
    with torch.no_grad():
        (last_patches, last_prefix), = ref.forward_intermediates(
            x, indices=[-1], norm=True, output_fmt="NLC", return_prefix_tokens=True,
            intermediates_only=True,
        )  # fmt: skip
        torch.testing.assert_close(normed.grid(x), torch.cat([last_prefix, last_patches], 1))
        torch.testing.assert_close(normed.grid(x), ref.norm(enc.grid(x)))
        (mid_patches, mid_prefix), = ref.forward_intermediates(
            x, indices=[-3], norm=False, output_fmt="NLC", return_prefix_tokens=True,
            intermediates_only=True,
        )  # fmt: skip
        torch.testing.assert_close(early.grid(x), torch.cat([mid_prefix, mid_patches], 1))
    # every parameter left gets a gradient (DDP needs no unused-parameter search)
    enc.train()
    enc(torch.randn(2, 3, 64, 64))[0].sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


def test_head_is_xavier_with_zero_bias() -> None:
    enc = ViTEncoder(TINY, embed_dim=512, pretrained=False, backbone_kwargs=KW)
    w, b = enc.fc.weight, enc.fc.bias
    bound = math.sqrt(6 / (64 + 512))
    assert w.shape == (512, 64) and torch.all(b == 0)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform(−a, a) has std a/√3


def test_token_dropping_in_training_packs_kept_tokens_with_lengths() -> None:
    enc = vit()
    x = torch.randn(64, 3, 64, 64)
    with torch.no_grad():
        full = enc.fc(enc.grid(x))  # [64, 17, 8]: every token through the head
        enc.train()
        torch.manual_seed(1)
        out, lengths = enc(x)
    assert (lengths < 17).any() and (lengths == 17).any()
    assert out.shape[1] == int(lengths.max())
    cls_dropped = 0
    for i in range(64):
        k = int(lengths[i])
        assert torch.all(out[i, k:] == 0)  # padding is exactly zero
        # the kept rows are tokens of this image, in their order, none twice
        match = [int(torch.nonzero((full[i] - row).abs().amax(1) < 1e-5)[0]) for row in out[i, :k]]
        assert match == sorted(set(match))
        cls_dropped += match[0] != 0
    assert cls_dropped > 0  # the CLS token can be dropped like any token (PCME++)
    enc.eval()
    assert enc(x[:3])[1].tolist() == [17, 17, 17]


def test_weights_only_from_local_files(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(GpoLitError, match="huggingface-cli download timm/test_vit.r160_in1k") as e:
        ViTEncoder(TINY, pretrained=True)
    assert "\n" not in str(e.value)
    # OpenAI's QuickGELU variant shares the weights repo of the plain CLIP model
    with pytest.raises(GpoLitError, match=r"download timm/vit_base_patch32_clip_224\.openai`"):
        ViTEncoder("vit_base_patch32_clip_quickgelu_224.openai", pretrained=True)
    torch.manual_seed(3)
    full = timm.create_model(TINY, pretrained=False, **KW)  # with its classifier head
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in full.state_dict().items()}}, tmp_path / "w.pth"
    )
    enc = ViTEncoder(TINY, embed_dim=8, checkpoint_path=str(tmp_path / "w.pth"), backbone_kwargs=KW)
    mine = enc.backbone.state_dict()
    assert mine and all(torch.equal(mine[k], full.state_dict()[k]) for k in mine)


def test_wrong_backbones_are_one_line() -> None:
    with pytest.raises(GpoLitError, match="expected a timm Vision Transformer.*model/visual=grid"):
        ViTEncoder("test_resnet.r160_in1k", pretrained=False)
    with pytest.raises(GpoLitError, match=r"out_index: expected a block index in \[-6, 5\]"):
        vit(out_index=6)
    with pytest.raises(GpoLitError, match="pool_grid: expected a CNN feature map"):
        vit().grid(torch.randn(1, 3, 64, 64), pool_grid=2)


# -- image settings ---------------------------------------------------------------------------
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's published statistics
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def reader_cfg(*overrides: str) -> dict:
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", "data=f30k_images", "model/visual=vit", *overrides)
    return OmegaConf.to_container(cfg.data.reader, resolve=True)


def test_transforms_imagenet_by_default_or_the_backbones_own() -> None:
    clip = "model.visual.backbone=vit_base_patch16_clip_224.openai"
    default = reader_cfg(clip)
    assert default["mean"] == [0.485, 0.456, 0.406] and default["std"] == [0.229, 0.224, 0.225]
    assert default["interpolation"] == "bilinear" and default["image_size"] == 512
    own = reader_cfg(clip, "data/transforms=backbone")
    assert own["mean"] == pytest.approx(CLIP_MEAN) and own["std"] == pytest.approx(CLIP_STD)
    assert own["interpolation"] == "bicubic" and own["image_size"] == 224
    tiny = reader_cfg(f"model.visual.backbone={TINY}", "data/transforms=backbone")
    assert tiny["mean"] == [0.5, 0.5, 0.5] and tiny["image_size"] == 160
    # an experiment's (or the command line's) size wins over the backbone's
    sized = reader_cfg(
        f"model.visual.backbone={TINY}", "data/transforms=backbone", "data.reader.image_size=64"
    )
    assert sized["image_size"] == 64 and sized["interpolation"] == "bicubic"


def test_reader_resizes_with_the_configured_filter(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    from gpo_lit.data.formats.images import ImageSplit

    root = make_image_tree(tmp_path / "f30k", n=2)
    views = {}
    for name in ("bilinear", "bicubic"):
        s = ImageSplit(
            root, "test", image_size=24, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation=name
        )
        im = Image.open(s.files[1]).convert("RGB").resize((24, 24), getattr(Image, name.upper()))
        expected = (np.asarray(im, np.float32).transpose(2, 0, 1) / 255 - 0.5) / 0.5
        np.testing.assert_allclose(views.setdefault(name, s.image(1)), expected, atol=1e-6)
    assert not np.allclose(views["bilinear"], views["bicubic"])  # the filter matters
    with pytest.raises(GpoLitError, match="data.reader.interpolation: expected one of nearest"):
        ImageSplit(root, "test", interpolation="cubic")


def test_transforms_of_an_unknown_backbone_are_one_line() -> None:
    with pytest.raises(Exception) as e:  # noqa: PT011 - OmegaConf wraps the resolver's error
        reader_cfg("model.visual.backbone=no_such_vit", "data/transforms=backbone")
    found = user_error(e.value)
    assert found is not None and "expected a timm model name, found 'no_such_vit'" in str(found)


# -- schedules --------------------------------------------------------------------------------
DEEP = {"img_size": 32, "depth": 12, "embed_dim": 16, "num_heads": 2}


class _Holder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.visual_encoder = vit("vit_tiny_patch16_224", backbone_kwargs=DEEP)
        self.loss_scale = 1.0


def test_block_stages_unfreeze_whole_blocks_by_name() -> None:
    m = _Holder()
    sched = BackboneSchedule(freeze_epochs=2, stages=[["blocks.11"], ["blocks.1"]], warmup=True)
    bb = m.visual_encoder.backbone

    def training() -> set[str]:
        return {".".join(n.split(".")[:2]) for n, p in bb.named_parameters() if p.requires_grad}

    sched.on_train_epoch_start(FakeTrainer(1, 10, 10), m)
    assert training() == set()
    sched.on_train_epoch_start(FakeTrainer(2, 10, 20), m)
    assert training() == {"blocks.11"}
    sched.on_train_batch_start(FakeTrainer(2, 10, 25), m, None, 5)
    assert m.loss_scale == pytest.approx(0.5)  # PCME++: loss ramped over the first trained epoch
    sched.apply(m, 3)
    assert training() == {"blocks.11", "blocks.1"}  # not blocks.10 … blocks.19-style neighbours
    with pytest.raises(GpoLitError, match=r"'blocks.12' \(blocks has 0, 1, 2, …, 9, 10, 11\)"):
        BackboneSchedule(stages=[["blocks.12"]]).apply(m, 1)


def test_lr_multipliers_match_whole_module_names() -> None:
    from hydra.utils import instantiate
    from omegaconf import open_dict

    cfg = compose_cfg(
        "train",
        "experiment=demo",
        "model.embed_dim=8",
        "optim.lr_mults={visual_encoder.backbone.blocks.1: 0.1}",
    )
    with open_dict(cfg):
        cfg.model.visual = {
            "_target_": "gpo_lit.encoders.ViTEncoder",
            "backbone": "vit_tiny_patch16_224",
            "embed_dim": 8,
            "pretrained": False,
            "backbone_kwargs": DEEP,
        }
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=WORDS)
    opt = model.configure_optimizers()["optimizer"]
    slow = next(g for g in opt.param_groups if g["lr"] == pytest.approx(5e-5))
    block1 = model.visual_encoder.backbone.blocks[1]
    assert {id(p) for p in slow["params"]} == {id(p) for p in block1.parameters()}


# -- make features ----------------------------------------------------------------------------
#: demo_grid with a tiny random-init ViT in place of its CNN, at the backbone's own image settings
def test_extracted_tokens_give_the_on_the_fly_embeddings(tmp_path) -> None:

    precomputed = ("model/visual=vit_precomp", "model.visual.in_dim=64")
    check_round_trip(tmp_path, VIT_DEMO, precomputed, cells=17, dim=64, head=ViTEncoder)


def test_make_features_records_the_token_choice_and_names_the_head(tmp_path, capsys) -> None:
    import json

    import numpy as np

    from gpo_lit.extract import extract

    common = (*TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}", "extract.splits=[test]")
    common = (*common, "extract.progress=false", f"extract.out_dir={tmp_path / 'f'}", *VIT_DEMO)
    written = extract(compose_cfg("extract", "experiment=demo_grid", *common))["test"]
    assert np.load(written).shape == (40, 17, 64)
    meta = json.loads((written.parent / "features_meta.json").read_text())
    assert (meta["prefix_tokens"], meta["norm"], meta["backbone"]) == (True, False, TINY)
    assert "model/visual=vit_precomp model.visual.in_dim=64" in capsys.readouterr().out
    # patch tokens alone are other features: not into the same folder
    other = compose_cfg(
        "extract", "experiment=demo_grid", *common, "model.visual.prefix_tokens=false"
    )
    with pytest.raises(GpoLitError, match=r"features_meta\.json: expected the settings"):
        extract(other)


@pytest.mark.parametrize(
    ("backbone", "n_tokens"),
    [
        ("vit_base_patch32_clip_quickgelu_224.openai", 50),  # CLIP ViT-B/32: CLS + 7 × 7
        ("vit_base_patch16_clip_quickgelu_224.openai", 197),  # B/16: CLS + 14 × 14
        ("vit_large_patch14_clip_quickgelu_224.openai", 257),  # L/14: CLS + 16 × 16
    ],
)
def test_clip_towers_give_pcmepp_token_counts(backbone: str, n_tokens: int) -> None:
    small = {"depth": 1, "embed_dim": 16, "num_heads": 2}  # the architecture's patching, tiny
    enc = ViTEncoder(backbone, embed_dim=8, pretrained=False, backbone_kwargs=small).eval()
    with torch.no_grad():
        assert enc.grid(torch.randn(1, 3, 224, 224)).shape == (1, n_tokens, 16)


def test_grad_checkpointing_gives_the_same_gradients() -> None:
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for on in (False, True):
        enc = vit(grad_checkpointing=on, size_augment=False).train()
        enc(x)[0].pow(2).sum().backward()
        grads.append(enc.backbone.blocks[0].attn.qkv.weight.grad)
    assert enc.backbone.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])
