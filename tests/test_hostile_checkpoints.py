"""Checkpoints from someone else: loading one never runs code, and every mistake is one line.

A real tiny training run gives a gpo_lit checkpoint (``best``) and a resumable one (``last``).
Hostile copies carry a payload in their stored configs (``hyper_parameters`` / ``gpo_lit_config``)
that Hydra would call when the model or the data pipeline is rebuilt. Every entry point that takes
a checkpoint (eval, an ensemble, ``extract.ckpt=``, the report's θ loading, resume with
``ckpt_path=``) must refuse them in one line with exit status 2 before anything is built: no file
created or changed anywhere under the test's folders, no command run (the payloads would create a
sentinel file).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import POOL, compose_cfg, one_line_error, run, write_job
from hydra.errors import InstantiationException
from hydra.utils import instantiate

from gpo_lit import eval as gpo_eval
from gpo_lit import extract as gpo_extract
from gpo_lit import report as gpo_report
from gpo_lit import train as gpo_train
from gpo_lit.cli import report_errors
from gpo_lit.components import (
    DEMO_GENERATORS,
    RUN_RECORD_KEYS,
    allowed_targets,
    check_stored_configs,
)
from gpo_lit.errors import GpoLitError, UnsafeCheckpointError, first_line

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "experiment=demo",
    "++data.demo.n_train=40",
    "++data.demo.n_dev=20",
    "++data.demo.n_test=20",
    "data.demo.feat_dim=6",
    "model.embed_dim=8",
    "model.visual.mlp_hidden=4",
    "data.batch_size=16",
    "data.eval_batch_size=20",
    "trainer.max_epochs=1",
    "logger=none",
    "test_after_fit=false",
    "+trainer.enable_progress_bar=false",
]
REFUSED = "expected a gpo_lit checkpoint whose configs name only gpo_lit components, found"
# torch's and numpy's advice to load with pickle enabled, in any of its spellings
ADVICE = re.compile(
    r"weights_only`?\W*(set to\W*)?`?false|allow_pickle\W*=\W*true|trust", re.IGNORECASE
)


class RunsShell:
    """Unpickling this runs a shell command (what ``torch.load(weights_only=False)`` allows)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One real tiny training run: its folder, data, best and last checkpoints."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose_cfg(
        "train",
        *TINY,
        f"paths.data_dir={root / 'data'}",
        f"paths.output_dir={root / 'run'}",
        "callbacks.last_checkpoint.train_time_interval=null",
        "callbacks.last_checkpoint.every_n_train_steps=4",
    )
    gpo_train.train(cfg)
    ckpts = root / "run" / "checkpoints"
    (best,) = ckpts.glob("best*.ckpt")
    return {"root": root, "run": root / "run", "best": best, "last": ckpts / "last.ckpt"}


@pytest.fixture
def case(tmp_path: Path, monkeypatch) -> dict[str, Path]:
    """A case folder (also the working directory), its sentinel and a pickle that runs a shell."""
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "pwned"
    evil = tmp_path / "weights.pt"
    torch.save({"weights": RunsShell(f"touch {sentinel}")}, evil)
    return {"dir": tmp_path, "sentinel": sentinel, "evil": evil}


def payloads(sentinel: Path, evil: Path) -> dict[str, dict[str, Any]]:
    """Config nodes that, built by Hydra, create ``sentinel`` or build a non-gpo_lit object."""
    return {
        "builtins.open": {"_target_": "builtins.open", "_args_": [str(sentinel), "w"]},
        "os.system": {"_target_": "os.system", "_args_": [f"touch {sentinel}"]},
        "pathlib.Path.write_text": {
            "_target_": "pathlib.Path.write_text",
            "_args_": [{"_target_": "pathlib.Path", "_args_": [str(sentinel)]}, "pwned"],
        },
        "torch.load": {"_target_": "torch.load", "f": str(evil), "weights_only": False},
        "collections.OrderedDict": {"_target_": "collections.OrderedDict"},
        "torch.nn.Linear": {"_target_": "torch.nn.Linear", "in_features": 6, "out_features": 8},
    }


PAYLOADS = list(payloads(Path("x"), Path("y")))
FOREIGN = {"collections.OrderedDict": dict, "torch.nn.Linear": torch.nn.Linear}


def craft(base: Path, out: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of our own checkpoint ``base`` changed by ``edit``."""
    ckpt = torch.load(base, map_location="cpu", weights_only=True)
    edit(ckpt)
    torch.save(ckpt, out)
    return out


def put(ckpt: dict, key_path: str, value: Any) -> None:
    *parents, last = key_path.split(".")
    node = ckpt
    for key in parents:
        node = node[key]
    node[last] = value


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file (content hash) and folder under ``roots``."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def run_entry(entry: str, ckpt: Path, trained: dict[str, Path], case: dict[str, Path]) -> Path:
    """Run ``entry`` in-process (Hydra compose + its task function + the one-line error handler)
    on ``ckpt``; returns the path the error must name. Raises SystemExit."""
    tmp = case["dir"]
    if entry == "report":  # the checkpoint is the best one of a finished GPO job of a sweep
        sweep = tmp / "sweep"
        sweep.mkdir()
        (sweep / "multirun.yaml").write_text("hydra: {}\n")
        stored = torch.load(ckpt, map_location="cpu", weights_only=True)
        job = write_job(sweep, 0, ["experiment=demo"], 0, POOL["gpo"], base=40.0, ckpt=stored)
        ckpt.unlink()
        ckpt = job / "checkpoints" / "best-epoch003.ckpt"
    before = snapshot(trained["root"], tmp)
    try:
        if entry in ("eval", "ensemble"):
            given = f"[{trained['best']},{ckpt}]" if entry == "ensemble" else str(ckpt)
            cfg = compose_cfg("eval", f"ckpt={given}", f"paths.output_dir={tmp / 'eval'}")
            report_errors(gpo_eval.main.__wrapped__)(cfg)
        elif entry == "extract":
            cfg = compose_cfg(
                "extract",
                "experiment=demo_grid",
                f"paths.data_dir={tmp / 'data'}",
                f"extract.ckpt={ckpt}",
                f"extract.out_dir={tmp / 'features'}",
            )
            report_errors(gpo_extract.main.__wrapped__)(cfg)
        elif entry == "report":
            cfg = compose_cfg("report", f"sweep_dir={tmp / 'sweep'}", f"out_dir={tmp / 'report'}")
            report_errors(gpo_report.main.__wrapped__)(cfg)
        elif entry == "resume":  # in place, into the trained run's folder
            cfg = compose_cfg(
                "train",
                *TINY,
                f"paths.data_dir={trained['root'] / 'data'}",
                f"paths.output_dir={trained['run']}",
                f"ckpt_path={ckpt}",
            )
            report_errors(gpo_train.main.__wrapped__)(cfg)
        else:
            raise AssertionError(entry)
    finally:
        assert snapshot(trained["root"], tmp) == before  # nothing created, changed or removed
    return ckpt


def refusal(capsys, entry, ckpt, trained, case) -> str:
    """The one error line of ``entry`` on ``ckpt`` (exit status 2, no traceback)."""
    with pytest.raises(SystemExit) as info:
        ckpt = run_entry(entry, ckpt, trained, case)
    assert info.value.code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert not case["sentinel"].exists()
    return lines[0]


def base_for(entry: str, trained: dict[str, Path]) -> Path:
    return trained["last" if entry == "resume" else "best"]


# ---- the payloads are live: built as loading used to build them, they do run -------------------
@pytest.mark.parametrize("name", PAYLOADS)
def test_each_payload_runs_when_hydra_builds_it(name: str, case) -> None:
    node = payloads(case["sentinel"], case["evil"])[name]
    if name == "os.system":  # some Hydra builds block-list it; others call it
        try:
            instantiate(node)
        except InstantiationException as err:
            assert "blocklisted" in str(err)
            os.system(*node["_args_"])  # what an instantiate without a block-list does
        assert case["sentinel"].exists()
        return
    built = instantiate(node)
    if name in FOREIGN:
        assert isinstance(built, FOREIGN[name]) and "gpo_lit" not in type(built).__module__
    else:
        if hasattr(built, "close"):
            built.close()
        assert case["sentinel"].exists()


# ---- every entry point refuses every payload, in one line, before anything is built -----------
@pytest.mark.parametrize("entry", ["eval", "ensemble", "extract", "report", "resume"])
@pytest.mark.parametrize("name", PAYLOADS)
def test_entry_points_refuse_hostile_checkpoints(entry, name, trained, case, capsys) -> None:
    node = payloads(case["sentinel"], case["evil"])[name]
    hostile = craft(
        base_for(entry, trained),
        case["dir"] / "hostile.ckpt",
        lambda c: put(c, "hyper_parameters.visual", node),
    )
    line = refusal(capsys, entry, hostile, trained, case)
    ckpt = hostile if entry != "report" else case["dir"] / "sweep/0/checkpoints/best-epoch003.ckpt"
    assert line == f"error: {ckpt}: {REFUSED} _target_ '{name}' at hyper_parameters.visual"


def _shell(case) -> dict:
    return {"_target_": "os.system", "_args_": [f"touch {case['sentinel']}"]}


# (where the payload goes, what is put there, what the line says is found, at which key path)
PLACEMENTS: list[tuple[str, Callable[[dict, dict], Any], str, str]] = [
    (
        "gpo_lit_config.data.reader",
        lambda c, case: {**_shell(case), "_partial_": True},
        "_target_ 'os.system'",
        "gpo_lit_config.data.reader",
    ),
    (
        "hyper_parameters.visual",
        lambda c, case: {**c["hyper_parameters"]["visual"], "_args_": [_shell(case)]},
        "_target_ 'os.system'",
        "hyper_parameters.visual._args_[0]",
    ),
    (
        "hyper_parameters.text.encoder",
        lambda c, case: {
            **c["hyper_parameters"]["text"]["encoder"],
            "options": {"deep": [1, {"_target_": "builtins.exec", "_args_": ["import os"]}]},
        },
        "_target_ 'builtins.exec'",
        "hyper_parameters.text.encoder.options.deep[1]",
    ),
    (
        "hyper_parameters.visual",
        lambda c, case: {"_target_": ["os", "system"]},
        "_target_ \"['os', 'system']\"",
        "hyper_parameters.visual",
    ),
    (  # a gpo_lit function, not a component class: it writes files
        "gpo_lit_config.data",
        lambda c, case: {"_target_": "gpo_lit.files.write_atomic", "path": "x", "data": "x"},
        "_target_ 'gpo_lit.files.write_atomic'",
        "gpo_lit_config.data",
    ),
    (  # a Lightning class conf/ uses, but only in the trainer it records
        "gpo_lit_config.data",
        lambda c, case: {"_target_": "pytorch_lightning.Trainer"},
        "_target_ 'pytorch_lightning.Trainer'",
        "gpo_lit_config.data",
    ),
    (
        "gpo_lit_config.data.demo_generator",
        lambda c, case: "os.system",
        "demo_generator 'os.system'",
        "gpo_lit_config.data",
    ),
    (
        "gpo_lit_config.data.root",
        lambda c, case: "${oc.env:HOME}",
        "the interpolation '${oc.env:HOME}' (stored configs are resolved)",
        "gpo_lit_config.data.root",
    ),
    (  # a resolver gpo_lit itself registers
        "hyper_parameters.visual.in_dim",
        lambda c, case: "${gpo_lit.report_dir:}",
        "the interpolation '${gpo_lit.report_dir:}' (stored configs are resolved)",
        "hyper_parameters.visual.in_dim",
    ),
]


@pytest.mark.parametrize("entry", ["eval", "resume"])
@pytest.mark.parametrize(
    ("key", "value", "found", "at"), PLACEMENTS, ids=[f"{p[3]} {p[2][:24]}" for p in PLACEMENTS]
)
def test_payloads_are_found_at_any_depth(
    entry, key, value, found, at, trained, case, capsys
) -> None:
    hostile = craft(
        base_for(entry, trained),
        case["dir"] / "hostile.ckpt",
        lambda c: put(c, key, value(c, case)),
    )
    line = refusal(capsys, entry, hostile, trained, case)
    assert line == f"error: {hostile}: {REFUSED} {found} at {at}"


def test_resume_refuses_callback_state_naming_files_outside_its_folder(
    trained, case, capsys
) -> None:
    """After a resume Lightning deletes superseded checkpoints named in ModelCheckpoint's state."""
    victim = trained["run"] / "checkpoints" / ".." / ".." / "data"

    def edit(c: dict) -> None:
        name = next(k for k in c["callbacks"] if "val/rsum" in k)
        c["callbacks"][name]["best_k_models"] = {str(victim): torch.tensor(1e9)}

    hostile = craft(trained["last"], case["dir"] / "hostile.ckpt", edit)
    line = refusal(capsys, "resume", hostile, trained, case)
    assert line.startswith(f"error: {hostile}: expected the checkpoint files its callback state")
    assert f"found '{victim}' in callbacks[" in line


def test_resume_refuses_a_random_state_that_is_not_generator_states(trained, case, capsys) -> None:
    """The stored random state is checked with the checkpoint, before any work: torch would
    stop a wrong-sized state with a traceback at the first resumed step."""

    def edit(c: dict) -> None:
        c["gpo_lit_random_state"]["ranks"][0]["cpu"] = torch.zeros(7, dtype=torch.uint8)

    hostile = craft(trained["last"], case["dir"] / "hostile.ckpt", edit)
    line = refusal(capsys, "resume", hostile, trained, case)
    assert line.startswith(f"error: {hostile}: expected in 'gpo_lit_random_state' the generator")
    assert line.endswith("found another value")


def test_the_recorded_trainer_and_callbacks_are_never_built(trained, case) -> None:
    """What a run records of its trainer, callbacks and logger is not checked (a run with its own
    callbacks stays loadable) because loading never builds it: a payload there stays inert."""

    def edit(c: dict) -> None:
        c["gpo_lit_config"]["trainer"]["plugins"] = [_shell(case)]
        c["gpo_lit_config"]["callbacks"]["early"] = {
            "_target_": "pytorch_lightning.callbacks.EarlyStopping",
            "monitor": "val/rsum",
        }
        c["gpo_lit_config"]["logger"] = {"mine": {**_shell(case), "name": "${oc.env:HOME}"}}

    ckpt = craft(trained["best"], case["dir"] / "recorded.ckpt", edit)
    out = case["dir"] / "eval"
    gpo_eval.evaluate_checkpoint(compose_cfg("eval", f"ckpt={ckpt}", f"paths.output_dir={out}"))
    assert (out / "metrics.json").is_file() and not case["sentinel"].exists()


def test_stored_output_paths_are_never_written(trained, case) -> None:
    """A checkpoint naming where to write embeddings has it ignored: eval writes only its own."""
    planted = case["dir"] / "planted.npz"
    ckpt = craft(
        trained["best"],
        case["dir"] / "paths.ckpt",
        lambda c: put(c, "hyper_parameters.evaluation.save_embeddings_to", str(planted)),
    )
    out = case["dir"] / "eval"
    gpo_eval.evaluate_checkpoint(compose_cfg("eval", f"ckpt={ckpt}", f"paths.output_dir={out}"))
    assert (out / "metrics.json").is_file() and not planted.exists()
    assert not (out / "embeddings.npz").exists()  # save_embeddings=false


def _strings(node: Any) -> list[str]:
    """Every string (keys too) anywhere in a nested config."""
    if isinstance(node, dict):
        return [str(k) for k in node] + [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list | tuple):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def test_checkpoint_hyper_parameters_hold_no_output_path(trained, case) -> None:
    """Output files are the entry points' and callbacks' (metrics.json, embeddings.npz), never the
    model's: a trained checkpoint's hyper-parameters name no path of the run, and a model loaded
    from an older checkpoint that stored some (``evaluation.results_to``, …) holds none either,
    so a checkpoint it saves cannot carry them on."""
    from gpo_lit.model import load_model

    hp = torch.load(trained["best"], map_location="cpu", weights_only=True)["hyper_parameters"]
    assert "evaluation" in hp
    found = [s for s in _strings(hp) if str(trained["root"]) in s or s.endswith((".json", ".npz"))]
    assert not found
    here = case["dir"]

    def plant(c: dict) -> None:
        put(c, "hyper_parameters.evaluation.results_to", str(here / "planted.json"))
        put(c, "hyper_parameters.evaluation.save_embeddings_to", str(here / "planted.npz"))

    model, _ = load_model(craft(trained["best"], here / "old.ckpt", plant))
    assert not [s for s in _strings(dict(model.hparams)) if "planted" in s]
    assert not [s for s in _strings(model.eval_cfg) if "planted" in s]
    assert model.eval_cfg["test_protocols"] == hp["evaluation"]["test_protocols"]


# ---- the everyday mistakes: one line naming the file, what was expected, what was found ---------
def _other_module(c: dict) -> None:
    """A Lightning checkpoint of another LightningModule."""
    c["hyper_parameters"] = {"hidden_size": 4, "lr": 0.1}
    c["state_dict"] = {"layer.weight": torch.zeros(4, 6), "layer.bias": torch.zeros(4)}
    c.pop("gpo_lit_config")


def _other_weights(c: dict) -> None:
    """The right hyper-parameters, weights of another shape, one key renamed."""
    sd = c["state_dict"]
    sd["visual_encoder.fc.weight"] = torch.zeros(16, 6)
    sd["renamed.bias"] = sd.pop("visual_encoder.fc.bias")


def _truncated(path: Path, good: Path) -> None:
    data = good.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _saved(obj: Any) -> Callable[[Path, Path], None]:
    return lambda path, good: torch.save(obj, path)


MISTAKES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "truncated": (_truncated, "a truncated or corrupt file"),
    "empty": (lambda p, g: p.write_bytes(b""), "an empty file"),
    "text": (lambda p, g: p.write_text("not a checkpoint\n"), "a file that is not a torch file"),
    "npy": (
        lambda p, g: p.write_bytes(_npy_bytes(np.save)),
        "a numpy .npy array, not a torch file",
    ),
    "npz": (
        lambda p, g: p.write_bytes(_npy_bytes(np.savez)),
        "a zip archive that is not a torch file (no data.pkl)",
    ),
    "raw pickle": (
        lambda p, g: p.write_bytes(pickle.dumps(RunsShell("true"))),
        "pickle data that is not a torch checkpoint",
    ),
    "pickled object": (
        _saved({"state_dict": RunsShell("true")}),
        "an object that only unpickling can build (posix.system;",
    ),
    "tensor": (
        _saved(torch.zeros(2, 3)),
        "(a dict of entries), found a saved tensor of shape [2, 3]",
    ),
    "no gpo_lit entries": (
        _saved({"model": {"w": torch.zeros(2)}}),
        "found no hyper_parameters, state_dict (its entries: 'model')",
    ),
}


def _npy_bytes(save: Callable) -> bytes:
    """What ``np.save`` / ``np.savez`` writes for a small array."""
    buf = io.BytesIO()
    save(buf, np.zeros(3))
    return buf.getvalue()


@pytest.mark.parametrize("entry", ["eval", "resume"])
@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_unreadable_files_are_one_line_without_pickle_advice(
    entry, mistake, trained, case, capsys
) -> None:
    make, found = MISTAKES[mistake]
    bad = case["dir"] / "given.ckpt"
    make(bad, base_for(entry, trained))
    line = refusal(capsys, entry, bad, trained, case)
    assert line.startswith(f"error: {bad}: expected ")
    if entry == "resume" and mistake == "no gpo_lit entries":
        found = "found no state_dict, optimizer_states, loops (its entries: 'model')"
    assert found in line
    assert not ADVICE.search(line), line


@pytest.mark.parametrize(
    ("entry", "edit", "found"),
    [
        (
            "eval",
            _other_module,
            "found those of another model (hidden_size, lr, no visual, no text)",
        ),
        (
            "eval",
            _other_weights,
            "expected the weights of the model its hyper_parameters describe, found no "
            "'visual_encoder.fc.bias'; the unexpected 'renamed.bias'; 'visual_encoder.fc.weight' "
            "of shape [16, 6] where the model has [8, 6]",
        ),
        (
            "resume",
            _other_weights,
            "expected the weights of the model this run's config builds, found no "
            "'visual_encoder.fc.bias'; the unexpected 'renamed.bias'; 'visual_encoder.fc.weight' "
            "of shape [16, 6] where the model has [8, 6]",
        ),
        (
            "resume",
            lambda c: [c.pop(k) for k in ("optimizer_states", "loops", "lr_schedulers")],
            "found no optimizer_states, loops",
        ),
    ],
    ids=["eval-other-module", "eval-other-weights", "resume-other-weights", "resume-weights-only"],
)
def test_other_models_checkpoints_say_what_differs(entry, edit, found, trained, case, capsys):
    bad = craft(base_for(entry, trained), case["dir"] / "other.ckpt", edit)
    line = refusal(capsys, entry, bad, trained, case)
    assert line.startswith(f"error: {bad}: expected ") and found in line, line


# ---- the allow-list: what conf/ writes into run configs is allowed, and only where it is -------
def _targets(node: Any, path: str):
    """(key path, target) of every ``_target_`` under a YAML node."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node["_target_"]
        for key, value in node.items():
            yield from _targets(value, f"{path}.{key}".lstrip("."))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}[{i}]")


def test_every_target_and_generator_of_conf_is_allowed_where_it_is() -> None:
    """conf/ names gpo_lit components, and other classes only in the trainer, callbacks and
    logger of the run config: the record that loading never builds."""
    found = []
    for file in (ROOT / "conf").rglob("*.yaml"):
        text = file.read_text()
        group = file.parent.relative_to(ROOT / "conf").as_posix().replace("/", ".")
        package = "" if "@package _global_" in text else group
        found += [(file, p, t) for p, t in _targets(yaml.safe_load(text) or {}, package)]
    assert len(found) > 20
    for file, path, target in found:
        root = path.split(".")[0].split("[")[0]
        # the trainer, callbacks and logger are a record nothing builds on load; hydra.*
        # (sweepers, launchers) never reaches a run config or a checkpoint
        if root in (*RUN_RECORD_KEYS, "hydra"):
            continue
        assert target in allowed_targets(), (file, path, target)
    text = "\n".join(p.read_text() for p in (ROOT / "conf").rglob("*.yaml"))
    generators = set(re.findall(r"demo_generator:\s*([\w.]+)", text))
    assert generators and generators <= DEMO_GENERATORS
    # gpo_lit functions (they write files) and classes gpo_lit merely imports are not components
    for name in ("gpo_lit.files.write_atomic", "gpo_lit.data.demo.regions.generate_demo"):
        assert name not in allowed_targets()
    assert "gpo_lit.data.datamodule.Path" not in allowed_targets()
    assert "gpo_lit.data.datamodule.RetrievalDataModule" in allowed_targets()


@pytest.mark.parametrize(
    "overrides",
    [
        ["experiment=demo"],
        ["experiment=demo_video"],
        ["experiment=demo_grid", "logger=wandb_csv"],
        ["experiment=f30k_butd_bert"],
        ["experiment=coco_wsl"],
        ["experiment=msrvtt_1ka_clip"],
    ],
)
def test_run_configs_gpo_train_stores_pass_the_check(overrides) -> None:
    """What ``gpo-train`` stores (the resolved run config) is never refused."""
    from omegaconf import OmegaConf

    cfg = compose_cfg("train", *overrides, "paths.output_dir=/runs/x")
    stored = OmegaConf.to_container(cfg, resolve=True)
    check_stored_configs("x.ckpt", {"gpo_lit_config": stored, "hyper_parameters": stored["model"]})


def test_words_of_the_vocabulary_are_data_not_config() -> None:
    check_stored_configs("x.ckpt", {"hyper_parameters": {"vocab": ["${x}", "a"]}})
    with pytest.raises(UnsafeCheckpointError, match=r"at hyper_parameters\.vocabs\[0\]"):
        check_stored_configs("x.ckpt", {"hyper_parameters": {"vocabs": ["${x}"]}})


def test_first_line_drops_torchs_advice_to_unpickle(tmp_path: Path) -> None:
    torch.save({"w": RunsShell("true")}, tmp_path / "a.pt")
    with pytest.raises(Exception) as info:
        torch.load(tmp_path / "a.pt", weights_only=True)
    assert ADVICE.search(str(info.value))  # torch does advise it
    line = first_line(info.value)
    assert line.startswith("UnpicklingError: Weights only load failed.")
    assert not ADVICE.search(line) and "\n" not in line
    assert first_line(ValueError("")) == "ValueError"
    long = ValueError("First sentence. " + "x" * 300)
    assert first_line(long) == "ValueError: First sentence."


def test_lightnings_own_loads_never_unpickle(case, monkeypatch) -> None:
    """Resuming and ``test(ckpt_path="best")`` load through AtomicCheckpointIO: weights only, even
    when Lightning asks otherwise or the environment forces torch's old default."""
    from gpo_lit.checkpoint_io import AtomicCheckpointIO, load_torch_file

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for load in (
        lambda: AtomicCheckpointIO().load_checkpoint(case["evil"], weights_only=False),
        lambda: load_torch_file(case["evil"], "a checkpoint"),
    ):
        with pytest.raises(GpoLitError, match="only unpickling can build .posix.system") as info:
            load()
        assert not ADVICE.search(str(info.value)) and not case["sentinel"].exists()
    with pytest.warns(UserWarning, match="forcing weights_only=False"):
        torch.load(case["evil"])  # the control: torch's default load does run the pickle
    assert case["sentinel"].exists()


def test_report_notes_an_unreadable_checkpoint_but_stops_at_a_hostile_one(
    trained, tmp_path: Path
) -> None:
    """A broken best checkpoint is a note of the report; one naming foreign code is an error."""
    sweep = tmp_path / "sweep"
    stored = torch.load(trained["best"], map_location="cpu", weights_only=True)
    write_job(sweep, 0, ["experiment=demo"], 0, POOL["gpo"], base=40.0, ckpt=stored)
    best = sweep / "0" / "checkpoints" / "best-epoch003.ckpt"
    best.write_bytes(b"garbage")
    report = gpo_report.build_report(sweep)
    assert any(str(best) in n and "not a torch file" in n for n in report.notes)
    stored["hyper_parameters"]["visual"] = {"_target_": "os.system", "_args_": ["true"]}
    torch.save(stored, best)
    with pytest.raises(UnsafeCheckpointError, match="_target_ 'os.system'"):
        gpo_report.build_report(sweep)
    assert isinstance(UnsafeCheckpointError("x"), GpoLitError)


@pytest.mark.slow
def test_gpo_eval_command_refuses_a_hostile_checkpoint(trained, case) -> None:
    """The wiring of ``python -m gpo_lit.eval``: one line, status 2, the command never runs."""
    hostile = craft(
        trained["best"],
        case["dir"] / "hostile.ckpt",
        lambda c: put(c, "gpo_lit_config.data", _shell(case)),
    )
    env_dir = case["dir"] / "eval_run"
    res = run("gpo_lit.eval", f"ckpt={hostile}", f"hydra.run.dir={env_dir}", cwd=case["dir"])
    line = one_line_error(res)
    assert line == f"error: {hostile}: {REFUSED} _target_ 'os.system' at gpo_lit_config.data"
    assert not case["sentinel"].exists()
    assert not (env_dir / "metrics.json").exists()


def test_non_finite_weights_are_named_where_the_model_has_none() -> None:
    # A diverged run's NaN/inf weights are refused when the state dict is checked (before any
    # split is embedded); a buffer that is -inf in the model too (a mask) is accepted.
    from gpo_lit.checkpoint_io import check_state_dict

    model = {"w": torch.zeros(2, 3), "mask": torch.tensor([0.0, float("-inf")])}
    ok = {"w": torch.ones(2, 3), "mask": torch.tensor([0.0, float("-inf")])}
    check_state_dict("a.ckpt", "its weights", model, ok)
    for bad in (float("nan"), float("inf")):
        w = torch.ones(2, 3)
        w[1, 2] = bad
        with pytest.raises(
            GpoLitError, match=r"^a\.ckpt: expected its weights, found NaN/inf in 'w'$"
        ):
            check_state_dict("a.ckpt", "its weights", model, {**ok, "w": w})


def test_a_folder_or_nothing_in_place_of_a_checkpoint_is_named_as_such(tmp_path: Path) -> None:
    from gpo_lit.checkpoint_io import load_torch_file

    (tmp_path / "dir.ckpt").mkdir()
    with pytest.raises(GpoLitError, match=r"dir\.ckpt: expected a checkpoint, found a folder$"):
        load_torch_file(tmp_path / "dir.ckpt", "a checkpoint")
    with pytest.raises(GpoLitError, match=r"no\.ckpt: expected a checkpoint, found no such file$"):
        load_torch_file(tmp_path / "no.ckpt", "a checkpoint")
