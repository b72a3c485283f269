"""The authors' checkpoint layout (REFERENCE §10) converts into gpo_lit models exactly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from helpers import WORDS, compose_cfg, make_image_tree, run, save_native, scan_file, tiny_model
from omegaconf import OmegaConf

from gpo_lit.convert import convert, read_authors_checkpoint
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError
from gpo_lit.eval import evaluate_checkpoint
from gpo_lit.model import load_model


def authors_layout(model, module_prefix: bool = False) -> dict:
    """Export a gpo_lit model into the authors' ``.pth`` layout (the inverse of the converter)."""
    sd = model.state_dict()
    pre = "module." if module_prefix else ""

    def pick(prefix: str, new: str) -> dict:
        return {pre + new + k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}

    img = pick("visual_encoder.", "") | pick("visual_pool.", "gpool.")
    txt = pick("text_encoder.", "") | pick("text_pool.", "gpool.")
    opt = argparse.Namespace(
        embed_size=8,
        img_dim=6,
        word_dim=300,
        precomp_enc_type="basic",
        data_name="f30k_precomp",
        margin=0.2,
    )
    return {"epoch": 3, "best_rsum": 1.0, "Eiters": 10, "opt": opt, "model": [img, txt]}


def test_bigru_checkpoint_round_trip(tmp_path: Path) -> None:
    model = tiny_model()
    torch.save(authors_layout(model), tmp_path / "model_best.pth")
    ckpt = read_authors_checkpoint(tmp_path / "model_best.pth")
    assert {
        "fc.weight",
        "mlp.layers.0.weight",
        "mlp.bns.1.running_mean",
        "gpool.gru.weight_ih_l0",
        "gpool.linear.weight",
    } <= set(ckpt["model"][0])
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    out = convert(
        tmp_path / "model_best.pth",
        tmp_path / "converted.ckpt",
        "data/x",
        vocab=str(tmp_path / "vocab.json"),
    )
    converted, run_cfg = load_model(out)
    assert run_cfg["data"]["root"] == "data/x"
    ref = model.state_dict()
    got = converted.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    with pytest.raises(GpoLitError, match="existing"):
        convert(tmp_path / "model_best.pth", out, "data/x", vocab=str(tmp_path / "vocab.json"))


def test_bigru_checkpoint_with_scan_vocab_file(tmp_path: Path) -> None:
    """``--vocab`` reads SCAN's JSON through ``Vocabulary.load`` (as training's vocab_file):
    its ids kept, ``<mask>`` appended as the released training did; a bad file is one line."""
    model = tiny_model()  # 7 embedding rows
    torch.save(authors_layout(model), tmp_path / "model_best.pth")
    path = scan_file(tmp_path, ["<pad>", "<start>", "<end>", "<unk>", "ball", "red"])
    out = convert(tmp_path / "model_best.pth", tmp_path / "c.ckpt", "data/x", vocab=str(path))
    tok = load_model(out)[0].tokenizer
    assert tok.encode("Red ball.")[0] == [1, 5, 4, 3, 2] and tok.mask_id == 6  # "." unknown
    path.write_text('{"word2idx": {}, "idx2word": {}, "idx": 0}')
    with pytest.raises(GpoLitError, match="word2idx") as err:
        convert(tmp_path / "model_best.pth", tmp_path / "d.ckpt", "data/x", vocab=str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_bert_checkpoint_with_dataparallel_prefix(tmp_path: Path) -> None:
    from transformers import BertConfig

    BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
    ).save_pretrained(tmp_path / "bert")
    from gpo_lit.convert import convert_state
    from gpo_lit.encoders import HFTextEncoder

    enc = HFTextEncoder(str(tmp_path / "bert"), embed_dim=8, pretrained=False)
    base = tiny_model()
    sd = authors_layout(base, module_prefix=True)
    txt = {f"module.{k}": v for k, v in enc.state_dict().items()}
    txt["module.bert.pooler.dense.weight"] = torch.zeros(16, 16)  # unused by VSE∞: dropped
    txt |= {k: v for k, v in sd["model"][1].items() if ".gpool." in k}
    sd["model"][1] = txt

    state, kind, image_kind = convert_state(sd, "x.pth")
    assert image_kind == "region"
    assert kind == "bert"
    assert "text_encoder.bert.embeddings.word_embeddings.weight" in state
    assert not any(k.startswith("text_encoder.bert.pooler") for k in state)
    assert torch.equal(state["text_encoder.linear.weight"], enc.linear.weight)
    assert torch.equal(state["visual_pool.gru.weight_hh_l0"], base.visual_pool.gru.weight_hh_l0)


def test_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    torch.save({"model": [{}, {}], "opt": Path("/etc/passwd")}, tmp_path / "evil.pth")
    with pytest.raises(GpoLitError, match="evil.pth") as info:
        read_authors_checkpoint(tmp_path / "evil.pth")
    assert "\n" not in str(info.value)


def test_a_checkpoint_without_the_tensors_sizes_are_read_off_is_one_line(tmp_path: Path) -> None:
    """The model's size comes from the image fc and the word embedding: their absence is named."""
    good = authors_layout(tiny_model())
    img, txt = good["model"]
    cases = [
        ([{}, txt], "a 2-d tensor fc.weight in the image encoder, found none"),
        ([{**img, "fc.weight": torch.zeros(8)}, txt],
         "a 2-d tensor fc.weight in the image encoder, found one of shape (8,)"),
        ([img, {k: v for k, v in txt.items() if k != "embed.weight"}],
         "a 2-d tensor embed.weight in the text encoder, found none"),
    ]  # fmt: skip
    for i, (model, found) in enumerate(cases):
        src = tmp_path / f"bad{i}.pth"
        torch.save({**good, "model": model}, src)
        with pytest.raises(GpoLitError) as info:
            convert(src, tmp_path / f"out{i}.ckpt", data_root=str(tmp_path), vocab=None)
        assert str(info.value) == f"{src}: expected {found}"
        assert not (tmp_path / f"out{i}.ckpt").exists()


@pytest.mark.slow
def test_converted_and_native_checkpoints_evaluate_identically(tmp_path: Path) -> None:
    from gpo_lit.data.demo.regions import generate_demo

    data = generate_demo(tmp_path / "demo", n_train=40, n_dev=20, n_test=40, feat_dim=6)
    model = tiny_model().eval()
    native = save_native(model, tmp_path / "native.ckpt", data)
    torch.save(authors_layout(model), tmp_path / "model_best.pth")
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    conv = convert(
        tmp_path / "model_best.pth",
        tmp_path / "converted.ckpt",
        str(data),
        vocab=str(tmp_path / "vocab.json"),
    )
    results = [  # in this process: gpo-eval's wiring is tested in test_train_eval
        evaluate_checkpoint(compose_cfg("eval", f"ckpt={ckpt}", f"paths.output_dir={tmp_path / n}"))
        for n, ckpt in (("native", native), ("converted", conv))
    ]
    assert results[0] == results[1]


# --- grid checkpoints ---------------------------------------------------------------------------
TINY_RESNET = ["model.visual.backbone_kwargs={channels:[4,8,8,16],stem_width:8}"]


def tiny_grid_model(*overrides: str):
    """demo_grid with a tiny bottleneck ResNet (torchvision key layout) and d = 8."""
    from hydra.utils import instantiate

    cfg = compose_cfg(
        "train",
        "experiment=demo_grid",
        "paths.output_dir=unused",
        "model.embed_dim=8",
        "model.visual.backbone=resnet26",
        "model.visual.out_index=-1",
        "model.visual.freeze_bn=true",
        *TINY_RESNET,
        *overrides,
    )
    torch.manual_seed(0)
    model = instantiate(cfg.model, _recursive_=False, _convert_="all", vocab=WORDS).eval()
    with torch.no_grad():  # non-trivial BN statistics and scales (timm zero-inits some)
        for name, t in model.visual_encoder.backbone.state_dict().items():
            if name.endswith(("running_var", "weight")) and t.ndim == 1:
                t.uniform_(0.5, 1.5)
    return model


def authors_grid_layout(model, source: str = "wsl") -> dict:
    """A gpo_lit grid model in the authors' layout: backbone.resnet (+ classifier), its twins
    backbone.base / backbone.top, image_encoder.fc / gpool (REFERENCE §10)."""
    sd = model.state_dict()
    bb = {
        k[len("visual_encoder.backbone.") :]: v
        for k, v in sd.items()
        if k.startswith("visual_encoder.backbone.")
    }
    img = {f"backbone.resnet.{k}": v for k, v in bb.items()}
    img |= {
        "backbone.resnet.fc.weight": torch.randn(1000, 64),
        "backbone.resnet.fc.bias": torch.zeros(1000),
    }
    base = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6"}
    for k, v in bb.items():
        head, rest = k.split(".", 1)
        if head in base:
            img[f"backbone.base.{base[head]}.{rest}"] = v.clone()
        else:
            img[f"backbone.top.{rest}"] = v.clone()
    img |= {
        "image_encoder." + k[len("visual_encoder.") :]: v
        for k, v in sd.items()
        if k.startswith("visual_encoder.fc.")
    }
    img |= {
        "image_encoder.gpool." + k[len("visual_pool.") :]: v
        for k, v in sd.items()
        if k.startswith("visual_pool.")
    }
    txt = {k[len("text_encoder.") :]: v for k, v in sd.items() if k.startswith("text_encoder.")}
    txt |= {
        "gpool." + k[len("text_pool.") :]: v for k, v in sd.items() if k.startswith("text_pool.")
    }
    opt = argparse.Namespace(embed_size=8, backbone_source=source, precomp_enc_type="backbone")
    return {"epoch": 3, "best_rsum": 1.0, "Eiters": 10, "opt": opt, "model": [img, txt]}


def test_grid_checkpoint_converts_exactly(tmp_path: Path) -> None:
    model = tiny_grid_model()
    torch.save(authors_grid_layout(model), tmp_path / "grid.pth")
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    kw = {"vocab": str(tmp_path / "vocab.json"), "backbone": "resnet26"}
    kw["backbone_kwargs"] = {"channels": [4, 8, 8, 16], "stem_width": 8}
    out = convert(tmp_path / "grid.pth", tmp_path / "grid.ckpt", "data/f30k", **kw)
    converted, run_cfg = load_model(out)
    ref, got = model.state_dict(), converted.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert run_cfg["data"]["reader"]["_target_"] == "gpo_lit.data.formats.images.ImageSplit"
    assert run_cfg["data"]["reader"]["image_size"] == 512
    assert not converted.visual_encoder.training or converted.visual_encoder.freeze_bn
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(
        converted.embed_images(x, torch.ones(2)), model.embed_images(x, torch.ones(2))
    )

    # the detector backbone: Caffe input (BGR, 0..255, Caffe means) and Caffe stride
    torch.save(authors_grid_layout(model, "detector"), tmp_path / "butd.pth")
    out = convert(tmp_path / "butd.pth", tmp_path / "butd.ckpt", "data/f30k", **kw)
    butd, run_cfg = load_model(out)
    assert butd.hparams["visual"]["caffe_stride"] is True
    assert butd.visual_encoder.backbone.layer2[0].conv1.stride == (2, 2)
    assert run_cfg["data"]["reader"]["bgr"] is True and run_cfg["data"]["reader"]["scale"] == 255


def test_grid_twins_must_match_and_shapes_name_the_backbone(tmp_path: Path) -> None:
    from gpo_lit.convert import infer_backbone

    layout = authors_grid_layout(tiny_grid_model())
    layout["model"][0]["backbone.top.0.conv1.weight"] += 1
    torch.save(layout, tmp_path / "bad.pth")
    with pytest.raises(
        GpoLitError,
        match=r"backbone\.top\.0\.conv1\.weight to repeat backbone\.resnet\.layer4\.0\.conv1\.weight",
    ):
        convert(tmp_path / "bad.pth", tmp_path / "bad.ckpt", "x", vocab="v", backbone="resnet26")
    with pytest.raises(GpoLitError, match="name it with --backbone"):
        good = authors_grid_layout(tiny_grid_model())
        torch.save(good, tmp_path / "good.pth")
        Vocabulary(WORDS).save(tmp_path / "vocab.json")
        convert(tmp_path / "good.pth", tmp_path / "x.ckpt", "x", vocab=str(tmp_path / "vocab.json"))

    import timm

    for name in ("resnext101_32x8d", "resnet101", "resnet152", "resnet50", "resnext50_32x4d"):
        with torch.device("meta"):  # shapes only, no memory
            net = timm.create_model(name, pretrained=False, features_only=True, out_indices=(-1,))
        state = {f"visual_encoder.backbone.{k}": v for k, v in net.state_dict().items()}
        assert infer_backbone(state, "x") == name


@pytest.mark.slow
def test_converted_and_native_grid_checkpoints_evaluate_identically(tmp_path: Path) -> None:
    from gpo_lit.convert import image_reader

    root = make_image_tree(tmp_path / "f30k", n=6)
    model = tiny_grid_model()
    data = {"root": str(root), "test_split": "test", "val_max_images": None}
    data["reader"] = image_reader(detector=False, image_size=64)
    torch.save(
        {
            "hyper_parameters": dict(model.hparams) | {"vocab": WORDS},
            "state_dict": model.state_dict(),
            "gpo_lit_config": {"data": data},
        },
        tmp_path / "native.ckpt",
    )
    torch.save(authors_grid_layout(model), tmp_path / "grid.pth")
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    res = run(
        "gpo_lit.convert",
        str(tmp_path / "grid.pth"),
        str(tmp_path / "converted.ckpt"),
        "--data-root",
        str(root),
        "--vocab",
        str(tmp_path / "vocab.json"),
        "--backbone",
        "resnet26",
        "--image-size",
        "64",
        cwd=tmp_path,
    )
    assert res.returncode == 2 and "expected tensors shaped as a resnet26" in res.stderr
    # the tiny ResNet needs its timm kwargs, which the CLI does not take: convert in-process
    convert(
        tmp_path / "grid.pth",
        tmp_path / "converted.ckpt",
        str(root),
        vocab=str(tmp_path / "vocab.json"),
        backbone="resnet26",
        backbone_kwargs={"channels": [4, 8, 8, 16], "stem_width": 8},
        image_size=64,
    )
    results = []
    for name in ("native", "converted"):  # in this process (gpo-eval's wiring: test_train_eval)
        ckpt = tmp_path / f"{name}.ckpt"
        cfg = compose_cfg("eval", f"ckpt={ckpt}", f"paths.output_dir={tmp_path / name}")
        results.append(evaluate_checkpoint(cfg))
    assert results[0] == results[1] and results[0]["full"]["rsum"] > 0


# --- the recipe ----------------------------------------------------------------------------------
def test_the_recipe_is_the_matching_experiment_composed_from_conf(tmp_path: Path) -> None:
    """Pooling, loss, optimiser and the data reader come from conf/experiment/ (composed here
    independently), dimensions from the tensors; --experiment picks another, a typo is one line."""
    from gpo_lit.convert import experiment_for

    model = tiny_model()
    layout = authors_layout(model)
    layout["opt"].data_name = "coco_precomp"
    torch.save(layout, tmp_path / "m.pth")
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    vocab = str(tmp_path / "vocab.json")
    out = convert(tmp_path / "m.pth", tmp_path / "c.ckpt", "data/x", vocab=vocab)
    stored = torch.load(out, weights_only=True)
    hp, run_cfg = stored["hyper_parameters"], stored["gpo_lit_config"]
    assert run_cfg["experiment"] == "coco_butd_bigru"
    want = compose_cfg("train", "experiment=coco_butd_bigru")
    for key in ("optim", "loss", "pooling"):
        assert hp[key] == OmegaConf.to_container(
            want[key] if key != "pooling" else want.model.pooling, resolve=True
        )
    assert hp["optim"]["weight_decay"] == 1e-2  # the BiGRU recipe, not BERT's 1e-4
    assert hp["embed_dim"] == 8 and hp["visual"]["in_dim"] == 6 and hp["visual"]["mlp_hidden"] == 4
    assert hp["evaluation"]["test_protocols"] == ["full"]
    assert run_cfg["data"]["root"] == "data/x" and run_cfg["data"]["reader"]["_target_"].endswith(
        "PrecompSplit"
    )

    out = convert(tmp_path / "m.pth", tmp_path / "b.ckpt", "x", vocab=vocab, experiment="demo")
    assert torch.load(out, weights_only=True)["gpo_lit_config"]["experiment"] == "demo"
    with pytest.raises(GpoLitError, match="--experiment: expected one of") as err:
        convert(tmp_path / "m.pth", tmp_path / "d.ckpt", "x", vocab=vocab, experiment="f30k_nope")
    assert "\n" not in str(err.value) and not (tmp_path / "d.ckpt").exists()

    opt = argparse.Namespace(data_name="f30k_precomp")
    assert experiment_for(opt, "region", "bert") == "f30k_butd_bert"
    assert experiment_for(opt, "detector", "bert") == "f30k_butd_grid_bert"
    assert experiment_for(argparse.Namespace(), "imagenet", "bigru") == "f30k_resnet152_bigru"
    assert experiment_for(opt, "wsl", "bigru") == "f30k_wsl"  # the backbone's, text swapped


def test_a_swapped_text_tower_keeps_no_multiplier_for_the_absent_one(tmp_path: Path) -> None:
    torch.save(authors_grid_layout(tiny_grid_model()), tmp_path / "grid.pth")
    Vocabulary(WORDS).save(tmp_path / "vocab.json")
    kw = {"vocab": str(tmp_path / "vocab.json"), "backbone": "resnet26"}
    kw["backbone_kwargs"] = {"channels": [4, 8, 8, 16], "stem_width": 8}
    out = convert(tmp_path / "grid.pth", tmp_path / "grid.ckpt", "data/f30k", **kw)
    hp = torch.load(out, weights_only=True)["hyper_parameters"]
    want = compose_cfg("train", "experiment=f30k_wsl").optim.lr_mults  # backbone ×0.01, BERT ×0.1
    assert hp["optim"]["lr_mults"] == {"visual_encoder.backbone": want["visual_encoder.backbone"]}
    assert "text_encoder.bert" in want
    assert hp["text"]["encoder"]["_target_"].endswith("BiGRUTextEncoder")
