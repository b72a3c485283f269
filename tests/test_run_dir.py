"""The run folder is decided before Hydra writes: no run clobbers another's records."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from helpers import one_line_error, run

from gpo_lit.errors import GpoLitError
from gpo_lit.run_dir import claim_new, hydra_quote, prepare

# A run that Hydra sets up completely and that then stops at once (its data does not exist).
FAILING = ["experiment=f30k_butd_bigru", "seed=3"]


def tree_hash(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder`` with a hash of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file()
        else "/"
        for p in sorted(folder.rglob("*"))
    }


@pytest.fixture(scope="module")
def old_run(tmp_path_factory) -> tuple[Path, list[str]]:
    """A run folder written by Hydra (``.hydra/``, the log) whose job then failed."""
    tmp = tmp_path_factory.mktemp("old")
    args = [*FAILING, f"paths.data_dir={tmp / 'nodata'}"]
    res = run("gpo_lit.train", *args, f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert "train_ims.npy" in one_line_error(res)
    assert (tmp / "run" / ".hydra" / "config.yaml").is_file()
    (tmp / "run" / "csv").mkdir()
    (tmp / "run" / "csv" / "metrics.csv").write_text("epoch,step\n0,0\n")
    return tmp / "run", args


def value_of(argv: list[str], key: str) -> str:
    (value,) = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return value


def test_runs_started_in_the_same_second_get_their_own_folders(tmp_path, monkeypatch) -> None:
    class Frozen(datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2030, 1, 2, 3, 4, 5)

    import hydra.core.utils

    monkeypatch.setattr(hydra.core.utils, "datetime", Frozen)
    monkeypatch.setenv("GPO_LIT_LOGS", str(tmp_path / "logs"))
    first = value_of(prepare("eval", ["ckpt=x.ckpt"]), "hydra.run.dir")
    second = value_of(prepare("eval", ["ckpt=x.ckpt"]), "hydra.run.dir")
    stamp = str(tmp_path / "logs" / "eval" / "eval" / "2030-01-02_03-04-05")
    assert (first, second) == (stamp, stamp + "-1")
    assert Path(first).is_dir() and Path(second).is_dir()
    sweeps = [
        value_of(
            prepare("train", ["-m", "experiment=demo", "model/pooling=gpo,max"]), "hydra.sweep.dir"
        )
        for _ in range(2)
    ]
    base = str(tmp_path / "logs" / "train" / "demo" / "multirun_2030-01-02_03-04-05")
    assert sweeps == [base, base + "-1"]


def test_claim_new_never_hands_out_a_taken_folder(tmp_path: Path) -> None:
    taken = tmp_path / "run"
    (taken).mkdir()
    (tmp_path / "run-1").mkdir()
    got = [claim_new(taken) for _ in range(3)]
    assert [p.name for p in got] == ["run-2", "run-3", "run-4"]


@pytest.mark.parametrize(
    "value", ["plain/path-1.ckpt", "a b,c.ckpt", "it's", "x; touch inj", "a\\"]
)
def test_hydra_quote_round_trips(value: str) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_override(f"k={hydra_quote(value)}")
    assert parsed.value() == value


@pytest.mark.slow
def test_an_existing_run_folder_is_refused_before_anything_is_written(old_run) -> None:
    folder, args = old_run
    before = tree_hash(folder)
    for module in ("gpo_lit.train", "gpo_lit.eval"):
        extra = args if module == "gpo_lit.train" else ["ckpt=x.ckpt"]
        res = run(module, *extra, f"hydra.run.dir={folder}", cwd=folder.parent)
        msg = one_line_error(res)
        assert msg.startswith(f"error: hydra.run.dir={folder}: expected a new or empty run folder")
        assert "found an existing one holding .hydra, csv, train.log" in msg
        assert tree_hash(folder) == before


@pytest.mark.slow
def test_resume_with_other_settings_names_the_keys(old_run) -> None:
    folder, args = old_run
    before = tree_hash(folder)
    with pytest.raises(GpoLitError) as err:
        prepare(
            "train",
            [*args, "seed=4", "trainer.max_epochs=3", f"hydra.run.dir={folder}", "ckpt_path=last"],
        )
    msg = str(err.value)
    assert msg.startswith(
        f"{folder / '.hydra' / 'config.yaml'}: expected the configuration of the run"
    )
    assert "seed (3 → 4)" in msg and "trainer.max_epochs (25 → 3)" in msg
    assert "resume_changes=allow" in msg and "ckpt_path" not in msg.split("found")[1]
    # The same overrides: accepted, and Hydra is told to record the resume beside the original.
    argv = prepare("train", [*args, f"hydra.run.dir={folder}", "ckpt_path=last"])
    assert value_of(argv, "hydra.output_subdir") == ".hydra/resume-1"
    assert tree_hash(folder) == before


@pytest.mark.slow
def test_a_resume_with_allowed_changes_is_recorded_and_keeps_the_original(old_run) -> None:
    folder, args = old_run
    original = {p.name: p.read_bytes() for p in (folder / ".hydra").glob("*.yaml")}
    res = run(
        "gpo_lit.train",
        *args,
        "seed=4",
        "resume_changes=allow",
        f"hydra.run.dir={folder}",
        "ckpt_path=last",
        cwd=folder.parent,
    )
    assert "train_ims.npy" in one_line_error(res)  # got past the folder checks to the data
    assert {p.name: p.read_bytes() for p in (folder / ".hydra").glob("*.yaml")} == original
    record = folder / ".hydra" / "resume-1"
    assert "resume_changes=allow" in yaml.safe_load((record / "overrides.yaml").read_text())
    assert yaml.safe_load((record / "config.yaml").read_text())["seed"] == 4
    assert (folder / "csv" / "metrics.csv").read_text() == "epoch,step\n0,0\n"  # no job started
    argv = prepare("train", [*args, f"hydra.run.dir={folder}", "ckpt_path=last"])
    assert value_of(argv, "hydra.output_subdir") == ".hydra/resume-2"


def test_resuming_a_missing_or_new_folder_is_refused(tmp_path: Path) -> None:
    typo = tmp_path / "logs" / "train" / "demo" / "2020-01-01_00-00-0"
    with pytest.raises(
        GpoLitError,
        match=r"expected an existing run folder to resume \(ckpt_path=last\), found no such folder",
    ):
        prepare("train", ["experiment=demo", f"hydra.run.dir={typo}", "ckpt_path=last"])
    assert not typo.exists()
    with pytest.raises(
        GpoLitError, match=r"^ckpt_path=last: expected hydra.run.dir=<the run folder to resume>"
    ):
        prepare("train", ["experiment=demo", "ckpt_path=last"])


@pytest.mark.slow
def test_a_mistyped_resume_folder_is_one_line(tmp_path: Path) -> None:
    typo = tmp_path / "2020-01-01_00-00-0"
    res = run(
        "gpo_lit.train", "experiment=demo", f"hydra.run.dir={typo}", "ckpt_path=last", cwd=tmp_path
    )
    assert str(typo) in one_line_error(res) and not typo.exists()


def test_config_changes_against_a_stored_config(tmp_path: Path) -> None:
    """The stored config as Hydra writes it (the composed job config without ``hydra``)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gpo_lit.cli import CONF_DIR

    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        OmegaConf.save(
            compose("train", ["experiment=demo", "seed=2"]), folder / ".hydra" / "config.yaml"
        )
    same = prepare(
        "train", ["experiment=demo", "seed=2", f"hydra.run.dir={folder}", "ckpt_path=last"]
    )
    assert value_of(same, "hydra.output_subdir") == ".hydra/resume-1"
    with pytest.raises(GpoLitError, match=r"model\.pooling\.name \(gpo → max\)"):
        prepare(
            "train",
            [
                "experiment=demo",
                "seed=2",
                "model/pooling=max",
                f"hydra.run.dir={folder}",
                "ckpt_path=last",
            ],
        )
    with pytest.raises(GpoLitError, match=r"resume_changes: expected refuse or allow, found yes"):
        prepare(
            "train",
            [
                "experiment=demo",
                "seed=2",
                "resume_changes=yes",
                f"hydra.run.dir={folder}",
                "ckpt_path=last",
            ],
        )


@pytest.mark.parametrize("text", ["a: [b: {\n", "- just\n- a list\n"])
def test_unreadable_stored_config_is_one_line_naming_it(tmp_path: Path, text: str) -> None:
    folder = tmp_path / "run"
    (folder / ".hydra").mkdir(parents=True)
    stored = folder / ".hydra" / "config.yaml"
    stored.write_text(text)
    before = tree_hash(folder)
    with pytest.raises(GpoLitError) as info:
        prepare("train", ["experiment=demo", f"hydra.run.dir={folder}", "ckpt_path=last"])
    msg = str(info.value)
    assert msg.startswith(f"{stored}: expected the YAML config of the run being resumed")
    assert "\n" not in msg and tree_hash(folder) == before


def test_a_resume_with_no_stored_config_to_compare_is_refused_unless_allowed(
    tmp_path: Path,
) -> None:
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"x")
    before = tree_hash(folder)
    args = ["experiment=demo", f"hydra.run.dir={folder}", "ckpt_path=last"]
    with pytest.raises(GpoLitError) as info:
        prepare("train", args)
    assert str(info.value) == (
        f"{folder / '.hydra' / 'config.yaml'}: expected the config of the run being resumed, to "
        "compare this resume's with (resume_changes=allow resumes without the comparison), "
        "found no such file"
    )
    assert tree_hash(folder) == before
    argv = prepare("train", [*args, "resume_changes=allow"])
    assert "hydra.output_subdir=.hydra/resume-1" in argv


def test_a_finished_run_is_not_resumed(tmp_path: Path) -> None:
    done = tmp_path / "done"
    (done / ".hydra").mkdir(parents=True)
    (done / "metrics.json").write_text("{}\n")
    with pytest.raises(GpoLitError, match="found a finished one"):
        prepare("train", ["experiment=demo", f"hydra.run.dir={done}", "ckpt_path=last"])


def test_a_sweep_folder_in_use_is_refused(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    with pytest.raises(
        GpoLitError, match=r"hydra.sweep.dir=.*: expected a new or empty sweep folder"
    ):
        prepare("train", ["-m", "experiment=demo", "seed=0,1", f"hydra.sweep.dir={sweep}"])
    assert prepare("train", ["-m", "experiment=demo", f"hydra.sweep.dir={tmp_path / 'new'}"])[
        -1
    ] == (f"hydra.sweep.dir={tmp_path / 'new'}")


def test_flags_and_bad_command_lines_are_left_to_hydra(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["--cfg", "job"], ["experiment=demo", "seed=0,1"], ["experiment=demo", "seed=[0"]):
        assert prepare("train", argv) == argv
    assert not (tmp_path / "logs").exists()


def test_a_new_null_seed_is_the_stored_one_in_a_resumes_config_check() -> None:
    from gpo_lit.run_dir import config_changes

    stored = {"seed": 458326542, "optim": {"lr": 0.0005}}
    assert config_changes(stored, {"seed": None, "optim": {"lr": 0.0005}}) == []
    assert config_changes(stored, {"seed": 3, "optim": {"lr": 0.0005}}) == ["seed (458326542 → 3)"]
    assert config_changes({"seed": None}, {"seed": 3}) == ["seed (None → 3)"]
