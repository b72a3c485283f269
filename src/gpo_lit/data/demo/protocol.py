"""The generate-once protocol every demo generator follows, its size checks and its command line.

A demo folder records what it holds in a meta file (the generator, its version and every
argument). :class:`DemoFolder`:

- **already generated**: the same meta, marked complete (or written before marks existed), and
  every expected file present: nothing is rewritten;
- **never clobber**: a different recorded demo, or data files without a meta, is an error (one
  line naming the folder or meta file) unless ``overwrite=True``;
- **safe under concurrent ranks**: the meta is written *first*, marked incomplete, and every file
  atomically; a second process (a DDP rank) that finds the same meta, complete or not, writes the
  same bytes again instead of taking the files for someone else's. An interrupted run is
  finished by the next call. The final meta is written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from gpo_lit.errors import GpoLitError, expect
from gpo_lit.files import write_atomic

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")  # a settings dataclass


def check_counts(prefix: str, **values: Any) -> None:
    """Each value a positive integer (an error naming ``{prefix} {name}`` otherwise)."""
    for name, v in values.items():
        ok = bool(isinstance(v, int | np.integer) and not isinstance(v, bool) and v >= 1)
        expect(ok, f"{prefix} {name}", "a positive integer", v)


def settings_of(cls: type[T], who: str, settings: dict[str, Any]) -> T:
    """The settings dataclass ``cls`` of generator ``who`` from keyword ``settings`` (an unknown
    name is one line naming ``who``; ``cls`` checks the values)."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(settings) - set(known))
    expect(not unknown, who, f"settings among {', '.join(known)}", ", ".join(unknown))
    return cls(**settings)


def meta_bytes(meta: dict) -> bytes:
    """A meta file's bytes (sorted keys: the same meta always gives the same file)."""
    return (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()


def _read_meta(path: Path) -> dict | str | None:
    """The meta of an existing demo (None if there is none, "unreadable" if it is not JSON)."""
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return "unreadable"
    return old if isinstance(old, dict) else "unreadable"


def _diff(meta: dict, old: object) -> tuple[str, str]:
    """The meta entries that differ, as ``k=v`` lists (wanted, found)."""
    if not isinstance(old, dict):
        return _kv(meta, list(meta)), "an unreadable meta file"
    keys = [k for k in sorted({*meta, *old}) if meta.get(k) != old.get(k)]
    return _kv(meta, keys), _kv(old, keys)


def _kv(d: dict, keys: list[str]) -> str:
    return ", ".join(f"{k}={d.get(k)}" for k in keys)


class DemoFolder:
    """One demo's folder under the generate-once protocol (module docstring).

    Args:
        root: the folder.
        meta_file: the meta file's name in ``root``.
        meta: what this call would generate (the generator, its version, every argument).
        files: the files a complete demo holds (all present, or it is generated again).
        foreign: the data files (relative names) in ``root`` whose presence without a meta means
            someone else's data set (a folder is named with a trailing ``/``).
        what: how an error names those files ("precomp files", "tar shards").
        mark_complete: the final meta records ``"complete": true`` (the video demo's files
            always have); otherwise the final meta is ``meta`` alone.
    """

    def __init__(
        self,
        root: Path,
        meta_file: str,
        meta: dict,
        files: Sequence[Path],
        *,
        foreign: Callable[[], list[str]],
        what: str,
        mark_complete: bool = False,
    ) -> None:
        self.root, self.meta_path, self.meta = root, root / meta_file, meta
        self.files, self.foreign, self.what = list(files), foreign, what
        self.mark_complete = mark_complete

    def start(self, overwrite: bool, stale: Callable[[], Iterable[Path]] = tuple) -> bool:
        """False when the demo is already there (nothing to do). Otherwise check that nothing
        else is in the way, write the meta marked incomplete, remove the ``stale`` files of an
        older demo when ``overwrite``, and return True: the caller writes every file (each
        atomically) and then calls :meth:`finish`."""
        for path in self.files:  # before the meta is touched: nothing could replace a folder
            expect(not path.exists() or path.is_file(), path, "a file (or none yet)", "a folder")
        if not overwrite:
            clash = self.foreign()  # before the meta: a concurrent writer writes its meta first
            old = _read_meta(self.meta_path)
            if old is not None:
                found = (
                    {k: v for k, v in old.items() if k != "complete"}
                    if isinstance(old, dict)
                    else old
                )
                if found != self.meta:
                    want, have = _diff(self.meta, found)
                    raise GpoLitError(
                        f"{self.meta_path}: expected a demo with {want} (use another root or "
                        f"overwrite=True), found {have}"
                    )
                assert isinstance(old, dict)
                if old.get("complete", True) and all(f.is_file() for f in self.files):
                    return False
                # else: interrupted, or another process (a DDP rank) writes the same bytes now
            elif clash:
                raise GpoLitError(
                    f"{self.root}: expected no {self.what} without {self.meta_path.name} (or "
                    f"overwrite=True), found {clash}"
                )
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.meta_path, meta_bytes({**self.meta, "complete": False}))
        if overwrite:
            for path in stale():
                path.unlink(missing_ok=True)
        return True

    def finish(self) -> Path:
        """Write the final meta (every file is in place) and return the folder."""
        final = {**self.meta, "complete": True} if self.mark_complete else self.meta
        write_atomic(self.meta_path, meta_bytes(final))
        return self.root


def existing(root: Path, names: Iterable[str]) -> list[str]:
    """Those of ``names`` (relative to ``root``) that exist; a folder counts when not empty."""
    out = []
    for name in names:
        path = root / name
        if path.is_dir():
            if any(path.iterdir()):
                out.append(f"{name.rstrip('/')}/")
        elif path.exists():
            out.append(name)
    return out


def generator_cli(
    generate: Callable[..., Path],
    prog: str,
    argv: list[str] | None,
    settings: type | None = None,
) -> int:
    """Command line of a demo generator: ``--root`` plus one ``--option`` per keyword argument of
    ``generate`` and per field of its ``settings`` dataclass (their defaults; a bool is a flag, a
    pair takes two numbers). Errors: one line, exit status 2."""
    p = argparse.ArgumentParser(prog=prog, description=(generate.__doc__ or "").splitlines()[0])
    p.add_argument("--root", required=True, help="output folder")
    options = [
        (name, param.default)
        for name, param in inspect.signature(generate).parameters.items()
        if name != "root" and param.kind is not param.VAR_KEYWORD
    ]
    if settings is not None:
        options += [(f.name, f.default) for f in dataclasses.fields(settings)]
    for name, default in options:
        flag = f"--{name.replace('_', '-')}"
        if isinstance(default, bool):
            p.add_argument(flag, action="store_true")
        elif isinstance(default, tuple | list):
            p.add_argument(flag, type=type(default[0]), nargs=len(default), default=default)
        else:
            p.add_argument(flag, type=type(default), default=default)
    args = vars(p.parse_args(argv))
    try:
        root = generate(**args)
    except GpoLitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"demo data set in {root}")
    return 0
