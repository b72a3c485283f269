"""What an evaluation writes besides metrics.json: the retrieval figure, per-query ranks, W&B
thumbnails, the report's pick-up of them; and the checks that run before anything is embedded."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import (
    ENV,
    POOL,
    TINY_GRID_DEMO,
    compose_cfg,
    eval_here,
    one_line_error,
    run,
    task_error,
    train_here,
    write_job,
)
from PIL import Image

from gpo_lit import report as rp
from gpo_lit.callbacks import (
    HIT,
    RetrievalExamples,
    RetrievalFigure,
    SaveRanks,
    query_examples,
    split_figure,
)
from gpo_lit.errors import GpoLitError
from gpo_lit.metrics import evaluate, recall_metrics, retrieval_ranks
from gpo_lit.metrics.collect import RankedEmbeddings
from gpo_lit.train import train


def toy(n_img: int = 12, per: int = 2, d: int = 8, seed: int = 0):
    """Continuous random embeddings (no ties), captions near their image."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, d, generator=g), dim=1)
    cap2img = torch.arange(n_img).repeat_interleave(per)
    cap = torch.nn.functional.normalize(
        img[cap2img] + torch.randn(len(cap2img), d, generator=g), dim=1
    )
    return img, cap, cap2img


def fake_split(n_img: int, cap2img, pictures: bool, video: bool = False):
    colours = [(40 * i % 255, 90, 200 - 10 * i % 200) for i in range(n_img)]
    ids = [f"id{i}" for i in range(n_img)]
    return SimpleNamespace(
        captions=[f"caption {j} of {int(i)}" for j, i in enumerate(cap2img)],
        image_ids=None if video else ids,
        video_ids=ids if video else None,
        display_image=(lambda i: Image.new("RGB", (20, 16), colours[i]))
        if pictures
        else (lambda i: None),
    )


def test_examples_take_ranks_and_lists_from_the_metrics() -> None:
    img, cap, cap2img = toy()
    ex = query_examples(img, cap, cap2img, n_queries=5, top_k=4)
    i2t, t2i = retrieval_ranks(img, cap, cap2img)
    sims = (img @ cap.T).numpy()
    assert [e.query for e in ex["text_to_image"]] == [0, 6, 12, 17, 23]
    for e in ex["text_to_image"]:
        assert e.rank == int(t2i[e.query]) and e.truth == [int(cap2img[e.query])]
        assert e.top == list(np.argsort(-sims[:, e.query])[:4])
        assert e.hits == [i == e.truth[0] for i in e.top]
    for e in ex["image_to_text"]:
        assert e.rank == int(i2t[e.query])
        assert e.top == list(np.argsort(-sims[e.query])[:4])
        assert sorted(e.truth) == [2 * e.query, 2 * e.query + 1]


@pytest.mark.parametrize("pictures,video", [(True, False), (False, False), (False, True)])
def test_figure_shows_pictures_or_says_why_not(pictures: bool, video: bool) -> None:
    img, cap, cap2img = toy()
    fig = split_figure(img, cap, cap2img, fake_split(12, cap2img, pictures, video), 3, 5)
    assert len(fig.axes) == 6 * (5 + 2)  # 3 + 3 queries × (query, top 5, ground truth)
    shown = sum(bool(ax.images) for ax in fig.axes)
    # pictures: every t2i cell but the caption, and the i2t query image
    assert shown == (3 * 6 + 3 if pictures else 0)
    title = fig._suptitle.get_text()
    assert ("no pixels" in title) == (not pictures and not video)
    assert ("feature vectors" in title) == video
    heads = [ax.get_title() for ax in fig.axes]
    assert any(h.startswith(HIT) for h in heads)  # toy captions are close: some hits
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"


def fake_run(img, cap, cap2img, split):
    ranked = RankedEmbeddings(img, cap, torch.as_tensor(cap2img))
    module = SimpleNamespace(evaluated={"test": ranked}, eval_cfg={"shard_size": 5})
    trainer = SimpleNamespace(
        is_global_zero=True,
        loggers=[],
        global_step=0,
        datamodule=SimpleNamespace(eval_split=lambda stage: split),
    )
    return trainer, module


def test_save_ranks_and_figure_write_new_files_only(tmp_path: Path) -> None:
    img, cap, cap2img = toy(seed=3)
    split = fake_split(12, cap2img, pictures=True)
    trainer, module = fake_run(img, cap, cap2img, split)
    SaveRanks(tmp_path / "ranks.npz").on_test_end(trainer, module)
    with np.load(tmp_path / "ranks.npz", allow_pickle=False) as z:
        got = {k: z[k] for k in z.files}
    assert set(got) == {
        "i2t_rank", "t2i_rank", "i2t_top", "t2i_top", "cap2img", "captions", "item_ids"
    }  # fmt: skip
    assert got["i2t_top"].shape == (12, 10) and got["t2i_top"].shape == (24, 10)
    assert recall_metrics(got["i2t_rank"], got["t2i_rank"]) == evaluate(img, cap, cap2img)
    assert list(got["item_ids"][:2]) == ["id0", "id1"] and got["captions"][3] == "caption 3 of 1"
    # the top lists agree with the ranks: rank < 10 iff a ground truth is listed
    listed = (got["cap2img"][got["i2t_top"]] == np.arange(12)[:, None]).any(axis=1)
    assert (listed == (got["i2t_rank"] < 10)).all()
    # README's error-analysis snippet
    r = np.load(tmp_path / "ranks.npz")
    worst = np.argsort(-r["t2i_rank"])[:10]
    lines = [
        f"{r['captions'][j]} -> {r['item_ids'][r['t2i_top'][j, 0]]} rank {r['t2i_rank'][j] + 1}"
        for j in worst
    ]
    assert len(lines) == 10 and lines[0].startswith("caption ")
    with pytest.raises(GpoLitError, match="ranks.npz: expected a new file"):
        SaveRanks(tmp_path / "ranks.npz").on_test_end(trainer, module)
    RetrievalFigure(tmp_path / "retrieval.png", n_queries=2).on_test_end(trainer, module)
    assert (tmp_path / "retrieval.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(GpoLitError, match="expected a new file"):
        RetrievalFigure(tmp_path / "retrieval.png").on_test_end(trainer, module)


def test_wandb_tables_carry_thumbnails_when_there_are_pictures() -> None:
    import wandb

    img, cap, cap2img = toy()
    with_pics = RetrievalExamples(n_queries=3).tables(
        img, cap, cap2img, fake_split(12, cap2img, pictures=True)
    )
    t2i = with_pics["retrieval/text_to_image"]
    assert all(isinstance(c, wandb.Image) for row in t2i.data for c in [row[1], *row[3:]])
    i2t = with_pics["retrieval/image_to_text"]
    assert all(isinstance(row[0], wandb.Image) and isinstance(row[3], str) for row in i2t.data)
    names = RetrievalExamples(n_queries=3).tables(img, cap, cap2img, fake_split(12, cap2img, False))
    assert all(isinstance(c, str) for row in names["retrieval/text_to_image"].data for c in row[3:])


def test_report_shows_eccv_columns_and_the_best_runs_figures(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for num, (pool, base) in enumerate((("gpo", 40.0), ("max", 30.0))):
        job = write_job(sweep, num, [f"model/pooling={pool}"], 0, POOL[pool], base=1.0)
        eccv = {f"{d}_{m}": base + i for i, (d, m) in enumerate(
            (d, m) for d in ("i2t", "t2i") for m in ("map_at_r", "rprecision", "r1"))}  # fmt: skip
        (job / "metrics.json").write_text(json.dumps({"coco_5k": {"rsum": 1.0}, "eccv": eccv}))
        Image.new("RGB", (8, 8)).save(job / "retrieval.png")
    report = rp.build_report(sweep, protocol="eccv")
    table = rp.format_table(report.rows)
    assert "I2T mAP@R | I2T R-P | I2T R@1 | T2I mAP@R" in table and "RSUM" not in table
    assert report.rows[0].config.visual == "gpo"  # sorted by the sum of the columns
    md = report.markdown
    assert "sorted by the sum of the columns" in md and "has no rsum" in md
    assert "![0](../0/retrieval.png)" in md and "../1/retrieval.png" not in md
    rp.write_report(report, tmp_path / "out")
    assert "![0](../sweep/0/retrieval.png)" in (tmp_path / "out" / "report.md").read_text()


# ---------------------------------------------------------------------------------------------
# end to end: checks before embedding, no run folder left, the figure on real demo pictures


@pytest.mark.slow
def test_eval_checks_first_then_writes_figure_and_ranks(tmp_path: Path, capsys) -> None:
    """The two refusals of a used or too small run go through the command line (subprocesses),
    the training and the evaluation that writes run in this process."""
    train_dir = tmp_path / "train"
    demo_grid = ("experiment=demo_grid", *TINY_GRID_DEMO, f"paths.data_dir={tmp_path / 'data'}")
    train_here(train_dir, *demo_grid, "trainer.max_epochs=1", "trainer.limit_train_batches=2")
    (ckpt,) = (train_dir / "checkpoints").glob("best-*.ckpt")

    # make eval CKPT=… protocols=[coco_5k] on a 40-image split: one line, before the model is
    # built or anything embedded, and no run folder left under logs/.
    proc = subprocess.run(
        [sys.executable, "-m", "gpo_lit.eval", f"ckpt={ckpt}", "protocols=[coco_5k]"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    msg = one_line_error(proc)
    assert "protocol coco_5k: expected 5000 images" in msg and "found 40" in msg
    assert not (tmp_path / "logs").exists(), "run folder left"

    # gpo-train checks its test protocols before training, too
    over = ("evaluation.test_protocols=[eccv]", f"paths.output_dir={tmp_path / 'train2'}")
    msg = task_error(train, compose_cfg("train", *demo_grid, *over), capsys, alone=False)
    assert "protocol eccv: expected 5000 images" in msg
    assert not (tmp_path / "train2" / "checkpoints").exists()

    # make eval CKPT=… figures=true save_ranks=true: the PNG of real (demo) pictures and ranks
    eval_dir = tmp_path / "eval"
    eval_here(eval_dir, f"ckpt={ckpt}", "figures=true", "save_ranks=true")
    png = Image.open(eval_dir / "retrieval.png")
    assert png.format == "PNG" and png.size[0] > 800
    metrics = json.loads((eval_dir / "metrics.json").read_text())["full"]
    with np.load(eval_dir / "ranks.npz", allow_pickle=False) as z:
        again = recall_metrics(z["i2t_rank"], z["t2i_rank"])
        assert z["i2t_top"].shape == (40, 10) and z["item_ids"][0] == "demo-test-00000"
    assert again == pytest.approx(metrics, abs=1e-9)
    res = run(
        "gpo_lit.eval", f"ckpt={ckpt}", "figures=true", f"hydra.run.dir={eval_dir}", cwd=tmp_path
    )
    msg = one_line_error(res)  # the used run folder is refused before anything is written
    assert "expected a new or empty run folder" in msg and "metrics.json" in msg


def test_a_failed_eval_removes_only_an_unused_run_folder(tmp_path: Path, monkeypatch) -> None:
    from gpo_lit.eval import holds_only_hydra_files, remove_unused_run_dir

    monkeypatch.chdir(tmp_path)
    logs = tmp_path / "logs"

    def hydra_run(name: str, log: str = "") -> Path:
        run_dir = logs / "eval" / "eval" / name
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("ckpt: x\n")
        (run_dir / "eval.log").write_text(log)
        return run_dir

    kept = hydra_run("with_log", log="something was logged\n")
    results = hydra_run("with_results")
    (results / "metrics.json").write_text("{}")
    for run_dir in (kept, results):
        assert not holds_only_hydra_files(run_dir)
        remove_unused_run_dir(run_dir, "logs")
        assert run_dir.is_dir()
    fresh = hydra_run("fresh")
    remove_unused_run_dir(fresh, "logs")
    assert not fresh.exists() and (logs / "eval" / "eval").is_dir()  # siblings keep the parents
    for run_dir in (kept, results):
        (run_dir / "eval.log").unlink()
        (run_dir / "metrics.json").unlink(missing_ok=True)
    remove_unused_run_dir(kept, "logs")
    remove_unused_run_dir(results, "logs")
    assert not logs.exists()  # the last run gone: the empty folders above it up to logs/ too
    (tmp_path / ".hydra").mkdir()
    remove_unused_run_dir(tmp_path, "logs")  # hydra.run.dir=. : never the working folder
    assert tmp_path.is_dir()
