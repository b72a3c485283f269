"""``gpo-eval ckpt=[a,b]``: a two-model ensemble ranks by the averaged similarity matrices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import (
    compose_cfg,
    eval_here,
    naive_metrics,
    save_native,
    spread_model,
    task_error,
    tiny_model,
)

from gpo_lit.data.demo.regions import generate_demo
from gpo_lit.errors import GpoLitError
from gpo_lit.eval import evaluate_checkpoint
from gpo_lit.metrics import load_embeddings
from gpo_lit.metrics.embeddings_io import save_embeddings
from gpo_lit.metrics.ensemble import load_members


@pytest.mark.slow
def test_two_model_ensemble_averages_similarities(tmp_path: Path, capsys) -> None:
    """In this process (gpo-eval's wiring is tested in test_train_eval)."""
    data = generate_demo(tmp_path / "demo", n_train=40, n_dev=20, n_test=60, feat_dim=6)
    ckpts = [save_native(spread_model(seed), tmp_path / f"m{seed}.ckpt", data) for seed in (1, 2)]
    out = tmp_path / "ens"
    capsys.readouterr()
    eval_here(out, f"ckpt=[{ckpts[0]},{ckpts[1]}]")
    assert "ensemble of 2 models" in capsys.readouterr().out

    members = [load_embeddings(out / f"member{i}" / "embeddings.npz") for i in (0, 1)]
    cap2img = members[0][2].numpy()
    sim = sum(img.double().numpy() @ cap.double().numpy().T for img, cap, _ in members) / 2
    got = json.loads((out / "metrics.json").read_text())["full"]
    want = naive_metrics(sim, cap2img)
    # Demo v2 scenes with the same objects give float32 near-ties that the float64 reference
    # breaks otherwise: the recalls must agree exactly, the mean/median ranks to within a rank.
    recalls = [k for k in want if "medr" not in k and "meanr" not in k]
    assert {k: got[k] for k in recalls} == pytest.approx({k: want[k] for k in recalls}, abs=1e-9)
    for k in set(want) - set(recalls):
        assert abs(got[k] - want[k]) <= 1.0, (k, got[k], want[k])
    # each member alone is what a single evaluation gives, and differs from the ensemble
    single = tmp_path / "single"
    eval_here(single, f"ckpt={ckpts[0]}")
    alone = json.loads((single / "metrics.json").read_text())
    assert json.loads((out / "member0" / "metrics.json").read_text()) == alone
    ref = naive_metrics(members[0][0].double().numpy() @ members[0][1].double().numpy().T, cap2img)
    assert {k: alone["full"][k] for k in recalls} == pytest.approx(
        {k: ref[k] for k in recalls}, abs=1e-9
    )
    for k in set(want) - set(recalls):  # near-ties, as above
        assert abs(alone["full"][k] - ref[k]) <= 1.0, (k, alone["full"][k], ref[k])

    assert got["rsum"] != alone["full"]["rsum"]  # the second model changed the ranking

    # members evaluated on different test splits cannot form an ensemble
    other = generate_demo(tmp_path / "demo2", n_train=40, n_dev=20, n_test=30, feat_dim=6)
    odd = save_native(spread_model(3), tmp_path / "odd.ckpt", other)
    cfg = compose_cfg("eval", f"ckpt=[{ckpts[0]},{odd}]", f"paths.output_dir={tmp_path / 'bad'}")
    err = task_error(evaluate_checkpoint, cfg, capsys)
    assert err == (
        f"error: {odd}: expected the same split as {ckpts[0]} (60 images, 300 captions, the same "
        "caption → image map), found 30 images, 150 captions"
    )
    assert not (tmp_path / "bad").exists()  # refused before either member was embedded
    # The saved members' check (python -m gpo_lit.metrics a.npz b.npz) is the same rule.
    npz = tmp_path / "odd.npz"
    img, cap, c2i = members[1]
    save_embeddings(npz, img, cap, c2i.flip(0))  # same sizes, another caption → image map
    with pytest.raises(GpoLitError, match="found 60 images, 300 captions and another caption"):
        load_members([out / "member0" / "embeddings.npz", npz])


def collapsed_model():
    """A tiny model with every parameter zero: every embedding is the zero vector, so every
    similarity ties (0) — a model that learned nothing."""
    model = tiny_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


@pytest.mark.slow
def test_eval_ties_option_single_and_ensemble(tmp_path: Path, capsys) -> None:
    # 20 test images × 5 captions, all similarities tied: pessimistic (the default) every query
    # ranks behind every other candidate (rsum 0, i2t rank 95, t2i rank 19); ties=optimistic gives
    # the strict count (every rank 0, rsum 600), for the ensemble and its members alike.
    data = generate_demo(tmp_path / "demo", n_train=40, n_dev=20, n_test=20, feat_dim=6)
    ckpt = save_native(collapsed_model(), tmp_path / "flat.ckpt", data)
    eval_here(tmp_path / "p", f"ckpt={ckpt}")
    got = json.loads((tmp_path / "p" / "metrics.json").read_text())["full"]
    assert got["rsum"] == 0.0 and got["i2t_medr"] == 96.0 and got["t2i_medr"] == 20.0

    out = tmp_path / "o"
    eval_here(out, f"ckpt=[{ckpt},{ckpt}]", "ties=optimistic")
    for path in (out / "metrics.json", out / "member0" / "metrics.json"):
        got = json.loads(path.read_text())["full"]
        assert got["rsum"] == 600.0 and got["i2t_medr"] == 1.0, path

    cfg = compose_cfg("eval", f"ckpt={ckpt}", "ties=worst", f"paths.output_dir={tmp_path / 'x'}")
    msg = task_error(evaluate_checkpoint, cfg, capsys, alone=False)
    assert msg == "error: ties: expected pessimistic or optimistic, found 'worst'"
    assert not (tmp_path / "x" / "metrics.json").exists()
