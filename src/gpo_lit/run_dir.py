"""The run folder, decided before Hydra writes anything into it.

An entry point's command line is composed here first (:func:`prepare`), so that a run never
clobbers the records of another:

- a new run claims a folder of its own (``<time>``, or ``<time>-1``, ``-2`` … when another run
  started in the same second), created atomically and passed to Hydra as ``hydra.run.dir``;
  a sweep claims its sweep folder the same way;
- ``hydra.run.dir=<a folder that holds anything>`` is refused, unless the job resumes into it
  (``ckpt_path=last`` or a checkpoint path): then the run's configuration must equal the
  stored one (``.hydra/config.yaml``; ``resume_changes=allow`` accepts the differences) and
  Hydra records the resume in ``.hydra/resume-<n>/`` beside the original, untouched;
- ``ckpt_path=last`` needs an existing, unfinished run folder; a requeued SLURM job
  (:func:`requeued_job`) running the same command again resumes as if it were given;
- the other ranks of a distributed launch write no records and no log file there (rank 0 may
  start last and must find the shared folder unused).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gpo_lit.config_dict import config_dict
from gpo_lit.errors import GpoLitError, expect, first_line
from gpo_lit.files import require_folder

IGNORED_CHANGES = ("ckpt_path", "resume_changes")  # what a resume may always set anew
SAFE = re.compile(r"[\w./:@+-]+")


def hydra_quote(value: str) -> str:
    """``value`` as one Hydra override value (quoted unless it is plain path characters)."""
    if SAFE.fullmatch(value):
        return value
    # Hydra reads backslashes literally except in a run before a quote (the closing one too),
    # where they are halved; a quote is escaped with one.
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m[1] * 2 + ("\\'" if m[2] else ""), value) + "'"


def claim_new(path: Path) -> Path:
    """Create ``path``, or ``path-1``, ``path-2`` … if taken: a folder no other run has.

    ``os.mkdir`` either creates the folder or fails, so two runs started at the same moment
    never get the same one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(10_000):
        candidate = path if n == 0 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise GpoLitError(f"{path}: expected a free run folder name, found 10000 taken")


def contents(folder: Path, limit: int = 5) -> str:
    """A short list of what ``folder`` holds (for error messages)."""
    names = sorted(p.name for p in folder.iterdir())
    more = f", … ({len(names)} entries)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def is_used(folder: Path) -> bool:
    """Whether ``folder`` exists and holds anything (an empty folder is as good as new)."""
    return folder.is_dir() and any(folder.iterdir())


def flat(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": leaf}`` of a config container (lists are leaves)."""
    if isinstance(cfg, dict):
        out: dict[str, Any] = {}
        for key, value in cfg.items():
            out.update(flat(value, f"{prefix}{key}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: cfg}


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key (old → new)`` for every leaf that differs, but those a resume may always set anew;
    a new ``seed`` of null is the stored one (the run drew it, and its resume takes it again:
    :func:`gpo_lit.train.choose_seed`), so a ``seed=null`` run resumes with its own overrides."""
    old, new = flat(old), flat(new)
    if new.get("seed", 0) is None and "seed" in old:
        new["seed"] = old["seed"]
    changes = []
    for key in sorted(set(old) | set(new)):
        if key.split(".")[0] in IGNORED_CHANGES:
            continue
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if a != b:
            changes.append(f"{key} ({a} → {b})")
    return changes


def changes_allowed(allow: object) -> bool:
    """``resume_changes``: ``allow`` → True, ``refuse`` → False, anything else one line."""
    expect(allow in ("refuse", "allow"), "resume_changes", "refuse or allow", allow)
    return allow == "allow"


def refuse_changes(where: object, expected: str, changes: list[str], allow: object) -> None:
    """One line naming the changed keys, unless ``resume_changes=allow``."""
    if not changes_allowed(allow) and changes:
        raise GpoLitError(
            f"{where}: expected {expected}, found changes in {'; '.join(changes)}; repeat the "
            "run's overrides, or add resume_changes=allow to resume with these changes "
            "(recorded in the run folder)"
        )


def next_resume_subdir(run_dir: Path, output_subdir: str) -> str:
    """``<output_subdir>/resume-<n>``: the first n not yet taken in ``run_dir``."""
    records = run_dir / output_subdir
    taken = [
        int(m.group(1))
        for p in records.glob("resume-*")
        if (m := re.fullmatch(r"resume-(\d+)", p.name))
    ]
    return f"{output_subdir}/resume-{max(taken, default=0) + 1}"


def check_resume(cfg: DictConfig, run_dir: Path) -> None:
    """A resume into ``run_dir`` must find an unfinished run with the same configuration."""
    ckpt = cfg.ckpt_path
    where = f"hydra.run.dir={run_dir}"
    if ckpt == "last":
        expect(
            run_dir.is_dir(),
            where,
            "an existing run folder to resume (ckpt_path=last)",
            "no such folder",
        )
        expect(
            is_used(run_dir), where, "a run folder to resume (ckpt_path=last)", "an empty folder"
        )
    if not is_used(run_dir):
        return  # a checkpoint of another run, continued in a new folder
    expect(
        not (run_dir / "metrics.json").exists(),
        where,
        "an unfinished run to resume",
        "a finished one (it holds metrics.json; not overwritten)",
    )
    stored_path = run_dir / str(cfg.hydra.output_subdir) / "config.yaml"
    allow = cfg.get("resume_changes", "refuse")
    if not stored_path.is_file():
        # Nothing to compare this resume's config with: only where the user says so.
        expect(
            changes_allowed(allow),
            stored_path,
            "the config of the run being resumed, to compare this resume's with "
            "(resume_changes=allow resumes without the comparison)",
            "no such file",
        )
        return
    new = config_dict(cfg, resolve=False)
    new.pop("hydra")
    try:
        loaded = OmegaConf.load(stored_path)
    except Exception as err:  # noqa: BLE001 - yaml's and OmegaConf's errors alike: one line
        raise GpoLitError(
            f"{stored_path}: expected the YAML config of the run being resumed, found "
            f"unreadable YAML ({first_line(err)})"
        ) from None
    expect(
        isinstance(loaded, DictConfig),
        stored_path,
        "the YAML config of the run being resumed (a mapping)",
        type(loaded).__name__,
    )
    stored = config_dict(loaded, resolve=False)
    changes = config_changes(stored, new)  # interpolations compared as written
    refuse_changes(stored_path, "the configuration of the run being resumed", changes, allow)


def requeued_job() -> bool:
    """Whether this process belongs to a SLURM job that was requeued (``SLURM_RESTART_COUNT``
    >= 1, set by SLURM in every task of a job it runs again): the job that the requeue signal
    stopped (:class:`gpo_lit.resume.StopOnSignal`), resuming from its last.ckpt."""
    count = os.environ.get("SLURM_RESTART_COUNT", "")
    return bool(os.environ.get("SLURM_JOB_ID")) and count.isdigit() and int(count) > 0


def other_rank() -> bool:
    """Whether this process is not the first of a distributed launch (torchrun's ``RANK``,
    SLURM's ``SLURM_PROCID``, Lightning's re-launched ``LOCAL_RANK`` children)."""
    return any(
        os.environ.get(k, "0") not in ("", "0") for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK")
    )


def other_rank_overrides(hc: DictConfig) -> list[str]:
    """What a rank > 0 adds to its command line: no ``.hydra/`` records and no log file (its
    messages go to its stderr). The ranks share one run folder; a file written there by
    another rank before rank 0 claims it would make rank 0 refuse it as used (torchrun on
    several nodes starts the ranks in any order). Lightning's own re-launched children already
    get ``hydra.output_subdir=null``; their rank 0 has claimed the folder, but the rule is one."""
    out = [] if hc.output_subdir is None else ["hydra.output_subdir=null"]
    logging = hc.get("job_logging") or {}
    handlers = logging.get("handlers") or {}
    files = {name for name, h in handlers.items() if isinstance(h, DictConfig) and "filename" in h}
    out += [f"~hydra.job_logging.handlers.{name}" for name in sorted(files)]
    users = {"root": logging.get("root")} | {
        f"loggers.{name}": node for name, node in (logging.get("loggers") or {}).items()
    }
    for key, node in users.items():
        used = list((node or {}).get("handlers") or [])
        if files & set(used):
            kept = ",".join(h for h in used if h not in files)
            out.append(f"hydra.job_logging.{key}.handlers=[{kept}]")
    return out


def prepare(config_name: str, argv: list[str]) -> list[str]:
    """The command line Hydra gets: ``argv`` plus the run folder this job may write to.

    Raises:
        GpoLitError: the run folder holds another run's records, or a resume cannot happen.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from gpo_lit.cli import CONF_DIR

    multirun = any(a in ("-m", "--multirun") for a in argv)
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in argv):
        return argv  # --help, --cfg, another config: Hydra writes no run folder, or not ours
    overrides = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        if any(o.is_sweep_override() for o in parsed) and not multirun:
            return argv  # Hydra reports it
        base = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
        with initialize_config_dir(CONF_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=base, return_hydra_config=True)
        hc = cfg.hydra
        multirun = multirun or str(hc.mode).endswith("MULTIRUN")
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        folder = Path(str(OmegaConf.select(cfg, key)))
    except Exception:  # noqa: BLE001 - Hydra reports bad command lines itself
        return argv
    require_folder(folder, key)  # Hydra would make it with a traceback
    if other_rank():  # rank 0 of the launch claims and checks the one shared run folder
        return [*argv, *other_rank_overrides(hc)]
    if hc.output_subdir is None:
        return argv  # Hydra keeps no records there; the job guards its own outputs
    given = any(o.key_or_group == key for o in parsed)
    ckpt = cfg.get("ckpt_path")
    requeued = "ckpt_path" in cfg and given and not multirun and requeued_job()
    if ckpt is None and requeued and is_used(folder):  # SLURM ran the same command again
        cfg.ckpt_path = ckpt = "last"  # resume where the requeue signal stopped it
        argv = [*argv, "ckpt_path=last"]
    where = f"{key}={folder}"
    if multirun:
        expect(
            not is_used(folder),
            where,
            "a new or empty sweep folder (a sweep is not resumed in place; resume its jobs one "
            "by one: hydra.run.dir=<job folder> ckpt_path=last)",
            f"an existing one holding {contents(folder) if is_used(folder) else ''}",
        )
    elif ckpt is not None:
        expect(
            given or ckpt != "last",
            "ckpt_path=last",
            "hydra.run.dir=<the run folder to resume> beside it",
            "no hydra.run.dir (a new run folder has nothing to resume)",
        )
        check_resume(cfg, folder)
        if is_used(folder):
            subdir = next_resume_subdir(folder, str(hc.output_subdir))
            return [*argv, f"hydra.output_subdir={hydra_quote(subdir)}"]
    else:
        expect(
            not is_used(folder),
            where,
            "a new or empty run folder"
            + (" (or a resume: ckpt_path=last)" if "ckpt_path" in cfg else ""),
            f"an existing one holding {contents(folder) if is_used(folder) else ''} (not overwritten)",
        )
    if given:
        return argv
    # Claimed now: Hydra resolves ${now:…} again and could land in the next second.
    return [*argv, f"{key}={hydra_quote(str(claim_new(folder)))}"]


def resume_command(run_dir: Path) -> str:
    """The command that resumes this (running) Hydra job in place, for ``make``."""
    from hydra.core.hydra_config import HydraConfig

    task = [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []
    keep = [o for o in task if not o.startswith(("experiment=", "ckpt_path="))]
    exp = next((o.split("=", 1)[1] for o in task if o.startswith("experiment=")), None)
    args = [f"hydra.run.dir={run_dir}", "ckpt_path=last"]
    if exp is None:
        return shlex.join(["python", "-m", "gpo_lit.train", *keep, *args])
    return shlex.join(["make", "train", f"EXP={exp}", *keep, *args])
