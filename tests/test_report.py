"""The sweep report: collecting jobs, aggregating seeds, the table, the plots, the CLI, the notebook."""

from __future__ import annotations

import functools
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import POOL, metrics_for, tiny_model, write_job
from omegaconf import OmegaConf

from gpo_lit import report as rp
from gpo_lit.errors import GpoLitError

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def tiny_checkpoint(seed: int) -> tuple[dict, torch.nn.Module]:
    """A real (tiny) GPO model saved in Lightning's checkpoint layout, and the model."""
    torch.manual_seed(seed)
    model = tiny_model().eval()
    return {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}, model


KMAX = ["+model/pooling@model.visual_pooling=kmax", "+model/pooling@model.text_pooling=kmax"]
# (visual K, text K, rsum base per seed): a 2 × 2 grid; the (1, 2) cell has 2 seeds.
GRID = [(1, 2, [30.0, 32.0]), (1, 100000, [25.0]), (100000, 2, [20.0]), (100000, 100000, [15.0])]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """gpo × 2 seeds (tiny real checkpoints), max × 2, mean × 2 (seed 1 unfinished), a K-max grid."""
    sweep = tmp_path_factory.mktemp("sweep")
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    common = ["+sweep=pooling", "experiment=demo"]
    num = 0
    for seed, base in ((0, 40.0), (1, 44.0)):
        ckpt, _ = tiny_checkpoint(seed)
        write_job(
            sweep, num, [*common, "model/pooling=gpo"], seed, POOL["gpo"], base=base, ckpt=ckpt
        )
        num += 1
    for seed, base in ((0, 35.0), (1, 36.0)):
        write_job(sweep, num, [*common, "model/pooling=max"], seed, POOL["max"], base=base)
        num += 1
    write_job(sweep, num, [*common, "model/pooling=mean"], 0, POOL["mean"], base=10.0)
    write_job(sweep, num + 1, [*common, "model/pooling=mean"], 1, POOL["mean"])  # unfinished
    num += 2
    for vk, tk, bases in GRID:
        over = [*common, *KMAX, f"model.visual_pooling.k={vk}", f"model.text_pooling.k={tk}"]
        for seed, base in enumerate(bases):
            nodes = {"name": "kmax", "k": vk}, {"name": "kmax", "k": tk}
            write_job(sweep, num, over, seed, POOL["gpo"], *nodes, base=base)
            num += 1
    return sweep


def rsum_of(base: float) -> float:
    return metrics_for(base)["rsum"]


# ---- collecting and aggregating -------------------------------------------------------------------
def test_collect_finds_every_job_and_reports_the_unfinished(sweep: Path) -> None:
    jobs = rp.collect_jobs(sweep)
    assert [j.name for j in jobs] == [str(i) for i in range(len(jobs))]  # natural order
    assert len(jobs) == 6 + 5
    (missing,) = [j for j in jobs if not j.finished]
    assert missing.name == "5" and "no metrics.json" in missing.problem
    assert jobs[0].seed == 0 and jobs[1].seed == 1
    assert jobs[0].key == jobs[1].key  # seeds group together
    assert "seed=0" not in jobs[0].key


def test_collect_refuses_a_folder_without_jobs(tmp_path: Path) -> None:
    with pytest.raises(GpoLitError, match="no such folder"):
        rp.collect_jobs(tmp_path / "nope")
    with pytest.raises(GpoLitError, match="found none") as info:
        rp.collect_jobs(tmp_path)
    assert "\n" not in str(info.value)


def test_aggregate_means_and_stds_by_hand(sweep: Path) -> None:
    protocol, rows = rp.aggregate(rp.collect_jobs(sweep))
    assert protocol == "full"  # the first protocol of metrics.json
    by = {(r.config.visual, r.config.text): r for r in rows}
    gpo = by[("gpo", "gpo")]
    assert gpo.n == 2 and gpo.seeds == [0, 1]
    assert gpo.mean["i2t_r1"] == pytest.approx(42.0)  # (40 + 44) / 2
    assert gpo.std["i2t_r1"] == pytest.approx(statistics.stdev([40.0, 44.0]))  # 2·sqrt(2)
    assert gpo.mean["t2i_r10"] == pytest.approx(47.0)
    assert gpo.mean["rsum"] == pytest.approx((rsum_of(40) + rsum_of(44)) / 2)
    assert gpo.std["rsum"] == pytest.approx(statistics.stdev([rsum_of(40), rsum_of(44)]))
    mx = by[("max", "max")]
    assert mx.mean["i2t_r5"] == pytest.approx(36.5) and mx.std["i2t_r5"] == pytest.approx(
        math.sqrt(0.5)
    )
    mean = by[("mean", "mean")]
    assert mean.n == 1 and len(mean.missing) == 1
    assert mean.mean["rsum"] == pytest.approx(rsum_of(10)) and math.isnan(mean.std["rsum"])
    # Sorted by mean rsum, best first.
    rsums = [r.mean["rsum"] for r in rows]
    assert rsums == sorted(rsums, reverse=True)
    assert rows[0] is gpo and rows[-1] is mean
    # Another protocol on request; an unknown one is one line.
    _, other = rp.aggregate(rp.collect_jobs(sweep), protocol="other")
    assert other[0].mean["i2t_r1"] == pytest.approx(32.0)
    with pytest.raises(GpoLitError, match="protocol: expected one of"):
        rp.aggregate(rp.collect_jobs(sweep), protocol="coco_5k")


def test_configurations_render_pooling_k_and_common_overrides(sweep: Path) -> None:
    jobs = rp.collect_jobs(sweep)
    configs = rp.describe(jobs)
    assert len(configs) == 3 + len(GRID)
    labels = {(c.visual, c.text) for c in configs.values()}
    assert {("kmax(k=1)", "kmax(k=2)"), ("kmax(k=N)", "kmax(k=N)"), ("gpo", "gpo")} <= labels
    assert {c.group for c in configs.values()} == {"demo"}
    assert all(c.other == "" for c in configs.values())  # only pooling and common overrides vary
    assert rp.common_overrides(jobs) == ["+sweep=pooling", "experiment=demo"]
    # A set size given explicitly changes what counts as N.
    small = rp.describe(jobs, {"visual": None, "text": 2})
    assert ("kmax(k=1)", "kmax(k=N)") in {(c.visual, c.text) for c in small.values()}


def test_table_bolds_the_best_mean_per_column(sweep: Path) -> None:
    _, rows = rp.aggregate(rp.collect_jobs(sweep))
    table = rp.format_table(rows)
    lines = table.splitlines()
    assert lines[0].startswith("| experiment | visual pooling | text pooling | n | I2T R@1")
    gpo_line = lines[2]
    assert "| gpo | gpo | 2 |" in gpo_line
    std = statistics.stdev([40.0, 44.0])
    assert f"**42.00 ± {std:.2f}**" in gpo_line
    assert gpo_line.count("**") == 2 * 7  # best in every column
    assert "| mean | mean | 1 (+1 missing) |" in table
    assert f"| {rsum_of(10):.2f} |" in table  # one seed: the mean alone
    # A tie for best bolds both.
    assert rp.format_cell(1.0, math.nan, bold=True) == "**1.00**"
    assert rp.format_cell(math.nan, math.nan) == "–"


def test_kmax_grid_detection(sweep: Path) -> None:
    _, rows = rp.aggregate(rp.collect_jobs(sweep))
    (grid,) = rp.kmax_grids(rows)
    assert grid.visual_k == [1, 100000] and grid.text_k == [2, 100000]
    assert grid.k_labels("visual") == ["1", "N"] and grid.k_labels("text") == ["2", "N"]
    assert grid.mean[0, 0] == pytest.approx((rsum_of(30) + rsum_of(32)) / 2)
    assert grid.mean[1, 1] == pytest.approx(rsum_of(15))
    assert grid.n.tolist() == [[2, 1], [1, 1]]
    assert grid.gpo_rsum == pytest.approx((rsum_of(40) + rsum_of(44)) / 2)
    assert rp.kmax_grids([r for r in rows if "kmax" not in r.config.visual]) == []
    one_cell = [r for r in rows if r.config.visual in ("gpo", "kmax(k=N)")][:2]
    assert rp.kmax_grids(one_cell) == []  # a single K-max cell is no grid


def fake_job(num: int, overrides: list[str], **config) -> rp.Job:
    cfg = OmegaConf.create({"seed": 0, "name": "demo", **config})
    return rp.Job(Path(str(num)), str(num), tuple(overrides), cfg, {"full": metrics_for(num)})


def test_other_varying_overrides_and_lookalike_configurations() -> None:
    model = {"pooling": {"name": "gem", "p": 3.0, "eps": 1e-6}, "visual": {"_target_": "a.B"}}
    gem2 = {**model, "pooling": {"name": "gem", "p": 2.0, "eps": 1e-6}}
    jobs = [
        fake_job(0, ["experiment=demo", "loss.margin=0.1", "seed=0"], model=model),
        fake_job(1, ["experiment=demo", "loss.margin=0.2", "+x=1", "seed=0"], model=model),
        # GeM with another p: p varies, so it is shown; eps does not.
        fake_job(2, ["experiment=demo", "model.pooling.p=2"], model=gem2),
        # Two Ks at or above the set size both read kmax(k=N): the overrides tell them apart.
        fake_job(3, ["experiment=demo", "model/pooling=kmax", "model.pooling.k=64"],
                 model={"pooling": {"name": "kmax", "k": 64}}),
        fake_job(4, ["experiment=demo", "model/pooling=kmax", "model.pooling.k=99"],
                 model={"pooling": {"name": "kmax", "k": 99}}),
    ]  # fmt: skip
    got = {c.key: (c.visual, c.other) for c in rp.describe(jobs).values()}
    assert got[jobs[0].key] == ("gem(p=3)", "loss.margin=0.1")
    assert got[jobs[1].key] == ("gem(p=3)", "loss.margin=0.2, +x=1")
    assert got[jobs[2].key] == ("gem(p=2)", "")
    assert got[jobs[3].key] == ("kmax(k=N)", "model.pooling.k=64")
    assert got[jobs[4].key] == ("kmax(k=N)", "model.pooling.k=99")
    assert rp.common_overrides(jobs) == ["experiment=demo"]


def test_theta_is_the_seed_average_of_the_checkpoints(sweep: Path) -> None:
    _, rows = rp.aggregate(rp.collect_jobs(sweep))
    curves, notes = rp.theta_curves(rows, {"visual": None, "text": 5})
    assert notes == []
    by = {c.modality: c for c in curves}
    assert set(by) == {"visual", "text"} and by["visual"].size == 36 and by["text"].size == 5
    models = [tiny_checkpoint(seed)[1] for seed in (0, 1)]
    with torch.no_grad():
        for modality, size in (("visual", 36), ("text", 5)):
            pools = [getattr(m, f"{modality}_pool") for m in models]
            thetas = torch.stack([p.weights_for_length(size) for p in pools]).numpy()
            c = by[modality]
            assert c.n == 2
            assert c.mean == pytest.approx(thetas.mean(0), abs=1e-6)
            assert c.std == pytest.approx(thetas.std(0, ddof=1), abs=1e-6)
            assert c.mean.sum() == pytest.approx(1.0, abs=1e-5)


def test_build_and_write_report_refuses_to_overwrite(sweep: Path, tmp_path: Path) -> None:
    report = rp.build_report(sweep)
    assert set(report.figures) == {"rsum.png", "kmax_grid.png", "gpo_theta.png"}
    out = tmp_path / "out"
    written = rp.write_report(report, out)
    assert {p.name for p in written} == {
        "report.md",
        "summary.csv",
        "rsum.png",
        "kmax_grid.png",
        "gpo_theta.png",
    }
    for p in written:
        assert p.stat().st_size > 0
    assert (out / "rsum.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "## Missing results" in md and "`5`" in md and "![kmax_grid](kmax_grid.png)" in md
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert csv_lines[0].startswith("experiment,visual_pooling,text_pooling,other,overrides,n,")
    assert csv_lines[1].startswith("demo,gpo,gpo,,") and ",2,0,0 1," in csv_lines[1]
    with pytest.raises(GpoLitError, match="report.md: expected a new file") as info:
        rp.write_report(report, out)
    assert "\n" not in str(info.value)
    rp.write_report(report, out, overwrite=True)


def test_cli_end_to_end(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "gpo_lit.report", f"sweep_dir={sweep}", f"out_dir={out}"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "| gpo | gpo | 2 |" in run.stdout  # the table is printed
    assert sorted(p.name for p in out.iterdir()) == [
        "gpo_theta.png",
        "kmax_grid.png",
        "report.md",
        "rsum.png",
        "summary.csv",
    ]
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2
    assert (
        again.stderr.strip().count("\n") == 0 and "report.md: expected a new file" in again.stderr
    )
    # A sweep folder that does not exist: one line, and no empty folders left behind.
    gone = tmp_path / "no_sweep"
    bad = subprocess.run(
        [sys.executable, "-m", "gpo_lit.report", f"sweep_dir={gone}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert bad.returncode == 2 and "found none" in bad.stderr
    assert not gone.exists()
    unset = subprocess.run(
        [sys.executable, "-m", "gpo_lit.report"], capture_output=True, text=True, cwd=tmp_path
    )
    assert unset.returncode == 2 and unset.stderr.startswith("error: sweep_dir: expected")
    for given in ("???", None, "", " "):  # `make report` without SWEEP_DIR passes sweep_dir=
        assert not rp._sweep_dir_given(OmegaConf.create({"sweep_dir": given}))


# ---- the notebook ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_notebook_runs_on_a_sweep(sweep: Path, tmp_path: Path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    # A kernel that runs this interpreter (the venv's), whatever kernels the machine has.
    spec = tmp_path / "jupyter" / "kernels" / "gpo-lit-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(json.dumps({"argv": argv, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("SWEEP_DIR", str(sweep))
    nb = nbformat.read(ROOT / "notebooks" / "pooling_sweep.ipynb", as_version=4)
    assert "SWEEP_DIR" in nb.cells[0].source
    client = nbclient.NotebookClient(
        nb,
        kernel_name="gpo-lit-test",
        timeout=120,
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = json.dumps([o.get("data", {}) for o in outputs])
    assert "| gpo | gpo | 2 |" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3
    assert not (sweep / "report").exists()  # the notebook writes nothing


def test_rsum_plot_starts_at_zero_has_a_legend_and_no_error_bar_for_one_seed(sweep: Path) -> None:
    """The bars of rsum.png are lengths from 0; the colours are explained; a configuration with
    one finished seed draws no error bar, one with two draws its sample std."""
    _, rows = rp.aggregate(rp.collect_jobs(sweep))
    fig = rp.plot_rsum(rows)
    (ax,) = fig.axes
    assert ax.get_xlim()[0] == 0.0
    drawn = [r for r in rows if r.n]
    assert ax.get_xlim()[1] >= max(
        r.mean["rsum"] + (r.std["rsum"] if r.n > 1 else 0) for r in drawn
    )
    bars = list(ax.patches)
    assert len(bars) == len(drawn) and all(b.get_x() == 0.0 for b in bars)
    legend = ax.get_legend()
    assert legend is not None
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["GPO pooling (either modality)", "other pooling"]
    # Error bars: one segment per configuration with n >= 2, of half-width its std.
    spread = sorted(r.std["rsum"] for r in drawn if r.n > 1)
    assert len(spread) < len(drawn)  # the sweep has single-seed configurations
    segments = [seg for coll in ax.collections for seg in coll.get_segments()]
    half_widths = sorted(float(seg[1][0] - seg[0][0]) / 2 for seg in segments)
    assert half_widths == pytest.approx(spread)


def test_a_row_counts_each_seed_once_and_only_seeds_with_every_metric() -> None:
    # A job folder copied twice (same configuration, same seed) is not a third seed; a job whose
    # metrics.json lacks a metric, or holds NaN / text, is unfinished (listed), never averaged
    # under a row's n it does not belong to.
    over = ["experiment=demo", "model/pooling=gpo"]

    def job(num: int, seed: int, metrics: dict) -> rp.Job:
        cfg = OmegaConf.create({"seed": seed, "name": "demo"})
        return rp.Job(Path(str(num)), str(num), (*over, f"seed={seed}"), cfg, {"full": metrics})

    a, b = metrics_for(10), metrics_for(20)
    lacking = {k: v for k, v in metrics_for(30).items() if k != "rsum"}
    jobs = [
        job(0, 0, a),
        job(1, 1, b),
        job(2, 0, a),  # a copy of job 0
        job(3, 2, lacking),
        job(4, 3, {**metrics_for(40), "rsum": math.nan}),
        job(5, 4, {**metrics_for(50), "i2t_r1": "abc"}),
    ]
    _, rows = rp.aggregate(jobs, "full")
    (row,) = rows
    assert row.n == 2 and sorted(row.seeds) == [0, 1]
    assert row.mean["rsum"] == statistics.fmean([a["rsum"], b["rsum"]])
    assert row.std["rsum"] == statistics.stdev([a["rsum"], b["rsum"]])
    problems = {j.name: j.problem for j in row.missing}
    assert problems["2"] == "repeats 0 (the same configuration and seed)"
    assert problems["3"] == "metrics.json lacks rsum"
    assert problems["4"] == "metrics.json: rsum is nan, not a number"
    assert problems["5"] == "metrics.json: i2t_r1 is 'abc', not a number"
