"""The authors' checkpoint layout (REFERENCE §10) converts into gpo_lit models exactly."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from gpo_lit.convert import convert, read_authors_checkpoint
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError
from gpo_lit.model import load_model
from tests.test_model import WORDS, tiny_model
from tests.test_train_eval import run


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

    state, kind = convert_state(sd, "x.pth")
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


@pytest.mark.slow
def test_converted_and_native_checkpoints_evaluate_identically(tmp_path: Path) -> None:
    from gpo_lit.data.demo import generate_demo

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
    results = []
    for name, ckpt in (("native", native), ("converted", conv)):
        res = run("gpo_lit.eval", f"ckpt={ckpt}", f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
        results.append(json.loads((tmp_path / name / "metrics.json").read_text()))
    assert results[0] == results[1]
