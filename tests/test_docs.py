"""Every command README.md and the config comments show is checked, and every repository path
README names exists.

A command is a ``make …``, ``gpo-…`` or ``python -m gpo_lit…`` line of a README code block or
inline code span, or of a config comment (``#   gpo-train …``, ``#   make …``); a span starting
with ``… `` continues a training command (overrides only). Each is checked the way it would run:

- ``make``: the target exists and ``make -n`` accepts the line; the ``python -m gpo_lit.…``
  commands it would run are then checked as below (so the Makefile's rewriting is checked too);
- Hydra entry points: the overrides compose with Hydra's own config loader (run or multirun, as
  the command would run); a multirun is split into jobs by Hydra's basic sweeper and the first
  and last job are composed; every value swept on the command line must change the job config
  (a sweep over a key nothing reads is a documentation bug);
- argparse commands: every ``--option`` shown is an option of the module's parser.

Placeholders (``…``, ``<time>``) stand for any value; ``[optional]`` parts are included.
Commands that are also run for real are listed in ``RUN_FOR_REAL`` with the test that runs them.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from gpo_lit.cli import CONF_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CONFIG_OF = {
    "gpo_lit.train": "train",
    "gpo_lit.eval": "eval",
    "gpo_lit.extract": "extract",
    "gpo_lit.report": "report",
}
SCRIPTS = {"gpo-train": "gpo_lit.train", "gpo-eval": "gpo_lit.eval",
           "gpo-extract": "gpo_lit.extract", "gpo-report": "gpo_lit.report"}  # fmt: skip
ARGPARSE = {
    "gpo_lit.convert",
    "gpo_lit.metrics",
    "gpo_lit.data.demo.regions",
    "gpo_lit.data.demo.images",
}
COMMAND = re.compile(r"^(make |gpo-\w+|python -m gpo_lit|… )")
# Commands of the documentation that a test also runs end to end (command: the test).
RUN_FOR_REAL = {
    "make sweep EXP=demo hparams_search=pooling_optuna": "tests/test_habits.py::"
    "test_make_sweep_optuna_search_optimises_validation_rsum",
    "gpo-train experiment=demo debug=fdr": "tests/test_habits.py::test_fast_dev_run_trains_and_tests",
    "gpo-train experiment=demo debug=limit": "tests/test_habits.py::"
    "test_limited_batches_rank_the_embedded_subset",
    "gpo-train experiment=demo debug=overfit": "tests/test_habits.py::test_overfit_batches",
    "gpo-train experiment=demo debug=profiler": "tests/test_habits.py::test_profiler_debug_mode",
    "make train EXP=demo": "tests/test_train_eval.py::test_train_then_eval_reproduces_metrics",
}


# ---- finding the commands ------------------------------------------------------------------------
def _clean(text: str) -> str:
    text = text.replace("\\|", "|")
    text = re.sub(r"\\\n\s*#?\s*", " ", text)  # shell line continuations (in comments too)
    return " ".join(text.split())


def readme_commands(text: str) -> list[str]:
    """Commands of README's code blocks (one per line, ``# comment`` cut) and code spans."""
    found = []
    blocks = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()
            if COMMAND.match(line):
                found.append(_clean(line))
    prose = re.sub(r"```[a-z]*\n.*?```", "", text, flags=re.S)
    for span in re.findall(r"`([^`]+)`", prose):
        span = _clean(span)
        if COMMAND.match(span):
            found.append(span)
    return list(dict.fromkeys(found))


def config_commands() -> list[tuple[str, str]]:
    """(config file, command) for the command lines of every config comment."""
    found = []
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        text = re.sub(r"\\\n#\s*", " ", path.read_text())  # continued comment lines
        for m in re.finditer(r"^#\s+((?:make |gpo-|python -m )[^\n]*)", text, re.M):
            line = _clean(m.group(1))
            line = re.split(r"\s{2,}#|\s#\s", " " + line)[0].strip()  # cut a trailing comment
            line = re.sub(r"\s*\((make [^)]*)\)$", "", line)  # "gpo-x …   (make y …)": two commands
            found.append((str(path.relative_to(ROOT)), line))
            inner = re.search(r"\((make [^)]*)\)", m.group(1))
            if inner:
                found.append((str(path.relative_to(ROOT)), _clean(inner.group(1))))
    return found


ALL = [("README.md", c) for c in readme_commands(README.read_text())] + config_commands()


def test_the_documentation_has_commands() -> None:
    """The extraction itself: README's table commands and the config comments are found."""
    commands = {c for _, c in ALL}
    assert "make train EXP=demo model/pooling=max" in commands
    assert "make sweep SWEEP=pooling EXP=demo" in commands
    assert "gpo-train experiment=demo debug=fdr" in commands
    assert any(c.startswith("python -m gpo_lit.convert") for c in commands)
    assert any(src.startswith("conf/hparams_search/") for src, _ in ALL)


def test_commands_run_for_real_are_tested() -> None:
    commands = {c for _, c in ALL}
    for command, test in RUN_FOR_REAL.items():
        assert command in commands, f"{command!r} is no longer in the documentation"
        file, name = test.split("::")
        assert f"def {name}(" in (ROOT / file).read_text(), test


# ---- checking one command ------------------------------------------------------------------------
def _tokens(command: str) -> list[str]:
    """Shell words, placeholders filled in, ``[optional]`` brackets dropped, ``…`` words left out."""
    out = []
    command = re.sub(r"<[^>]*overrides>", "", command)  # "<the run's overrides>": none here
    command = re.sub(r"<[^>]*>", "X", command)  # before splitting: "<the run's …>" has a quote
    for tok in shlex.split(command):
        if tok == "…":
            continue
        if tok.startswith("[") and tok.endswith("]") and "=" in tok:
            tok = tok[1:-1]  # [split=dev] is an optional override
        tok = re.sub(r"<[^>]*>", "X", tok).replace("…", "X")
        out.append(tok)
    return out


def _make_commands(tokens: list[str]) -> list[list[str]]:
    """``make -n`` of the line (the target must exist); the gpo_lit commands it would run."""
    res = subprocess.run(
        ["make", "-n", "--no-print-directory", *tokens[1:], "PY=python"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    runs = []
    for line in res.stdout.splitlines():
        words = shlex.split(line)
        if len(words) > 2 and words[1] == "-m" and words[2].startswith("gpo_lit"):
            runs.append(words[2:])
    return runs


def _check_argparse(module: str, args: list[str]) -> None:
    import importlib

    mod = importlib.import_module(
        module if module != "gpo_lit.metrics" else "gpo_lit.metrics.__main__"
    )
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        mod.main(["--help"])
    for opt in (a.split("=")[0] for a in args if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(opt)}\b", out.getvalue()), f"{module}: no {opt}"


def _job_config(cfg):
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    return plain


def _check_hydra(config_name: str, args: list[str]) -> None:
    """Compose as Hydra would run the command (see the module docstring)."""
    from hydra import initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.types import RunMode

    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        if not multirun:  # unless a config asks for a multirun itself (hydra.mode)
            cfg = loader.load_configuration(config_name, overrides, RunMode.RUN)
            if str(cfg.hydra.get("mode")) != "RunMode.MULTIRUN":
                return
        master = loader.load_configuration(config_name, overrides, RunMode.MULTIRUN)
        sweeper = master.hydra.sweeper
        if not str(sweeper._target_).endswith("BasicSweeper"):
            return  # Optuna: the search space is drawn per trial (run for real in test_habits)
        params = [f"{k}={v}" for k, v in (sweeper.get("params") or {}).items()]
        task = list(master.hydra.overrides.task)  # what Hydra hands the sweeper (no hydra.*)
        jobs = BasicSweeper.split_arguments(parser.parse_overrides(params + task), None)[0]
        first = loader.load_sweep_config(master, list(jobs[0]))
        loader.load_sweep_config(master, list(jobs[-1]))
        # A value swept on the command line must change the job's config.
        for o in parsed:
            if not o.is_sweep_override():
                continue
            key = o.get_key_element()
            values = list(o.sweep_string_iterator())
            other = [f"{key}={values[-1]}" if j.split("=", 1)[0] == key else j for j in jobs[0]]
            changed = loader.load_sweep_config(master, other)
            assert _job_config(changed) != _job_config(first), (
                f"sweeping {key} over {values} changes nothing in the job config"
            )


def check_command(command: str) -> None:
    tokens = _tokens(command)
    if tokens[0] == "make":
        runs = _make_commands(tokens)
    elif tokens[0] in SCRIPTS:
        runs = [[SCRIPTS[tokens[0]], *tokens[1:]]]
    elif tokens[:2] == ["python", "-m"]:
        runs = [tokens[2:]]
    else:  # "… overrides": the rest of a training command
        runs = [["gpo_lit.train", "experiment=demo", *tokens]]
    for module, *args in runs:
        if module in ARGPARSE:
            _check_argparse(module, args)
        else:
            assert module in CONFIG_OF, f"{command}: unknown entry point {module}"
            _check_hydra(CONFIG_OF[module], args)


@pytest.mark.parametrize(("source", "command"), ALL, ids=[f"{s}: {c}" for s, c in ALL])
def test_documented_command(source: str, command: str) -> None:
    check_command(command)


def test_the_check_catches_broken_commands() -> None:
    """What the check rejects: an unknown target, group option or key, a sweep over nothing."""
    bad = [
        "make no-such-target",
        "make train EXP=demo model/pooling=median",
        "gpo-train experiment=demo trainer.no_such_key=1",
        "make sweep SWEEP=pooling EXP=demo 'hydra.sweeper.params.model/pooling@model.text_pooling=max,mean'",
        "make sweep SWEEP=features EXP=demo 'hydra.sweeper.params.experiment=demo,demo_video'",
        "python -m gpo_lit.metrics a.npz --no-such-option",
    ]
    for command in bad:
        with pytest.raises(Exception):  # noqa: B017, PT011 - any failure of the check
            check_command(command)


# ---- paths named in README -----------------------------------------------------------------------
REPO_DIRS = ("src/", "conf/", "tests/", "bench/", "notebooks/", "docs/")
FILE_TYPES = (".py", ".yaml", ".md", ".ipynb", ".toml")


def readme_paths(text: str) -> list[str]:
    """Repository paths README points at: link targets and code spans that are paths (a folder of
    the repository, or a file type of it), not the run-time ones (``logs/``, ``data/``)."""
    spans = re.findall(r"`([^`\s]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
    found = []
    for span in spans:
        if "://" in span or span.startswith(("#", "logs/", "data/", ".")) or "/" not in span:
            continue
        if re.search(r"[<>{}*$…|]", span):
            continue  # a pattern or a placeholder, not a path
        span = span.split("#", 1)[0]
        if span.startswith(REPO_DIRS) or span.endswith(FILE_TYPES):
            found.append(span)
    return list(dict.fromkeys(found))


def test_readme_paths_exist() -> None:
    paths = readme_paths(README.read_text())
    assert "docs/DESIGN.md" in paths and "conf/experiment/demo.yaml" in paths
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README points at paths not in the repository: {missing}"


def test_readme_path_check_rejects_a_missing_file() -> None:
    assert readme_paths("See `shared/DESIGN.md` and [x](docs/nope.md), not `logs/a/b.py`.") == [
        "shared/DESIGN.md",
        "docs/nope.md",
    ]


if __name__ == "__main__":  # list what is checked
    for s, c in ALL:
        print(f"{s}: {c}", file=sys.stdout)
