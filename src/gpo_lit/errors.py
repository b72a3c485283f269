"""One exception type for user-facing problems (bad files, bad config values).

Its message is a single line naming the file or option, what was expected and what was found; the
entry points print it without a traceback and exit with status 2.
"""

from __future__ import annotations


class GpoLitError(ValueError):
    """A problem with user input: a data file, a checkpoint or a config value."""


def expect(cond: bool, where: object, expected: str, found: object) -> None:
    """Raise ``GpoLitError("<where>: expected <expected>, found <found>")`` unless ``cond``."""
    if not cond:
        raise GpoLitError(f"{where}: expected {expected}, found {found}")


class MissingFileError(GpoLitError):
    """A data file or folder the configuration points at does not exist."""


def require_file(path: object, expected: str) -> None:
    """Raise :class:`MissingFileError` naming ``path`` unless it is an existing file."""
    from pathlib import Path

    p = Path(str(path))
    if not p.is_file():
        found = "no such folder" if not p.parent.is_dir() else "no such file"
        raise MissingFileError(f"{p}: expected {expected}, found {found}")
