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


def one_line(err: GpoLitError) -> str:
    """The one-line message of ``err``, also of the copy a DataLoader worker sends back.

    torch re-raises a worker's exception in the main process as the same type, with the message
    ``Caught <type> in DataLoader worker process <k>.\\nOriginal Traceback …\\n<module>.<type>:
    <message>``: the original message is the traceback's last line.
    """
    text = str(err)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    last = text.rstrip("\n").rsplit("\n", 1)[-1]
    prefix = f"{type(err).__module__}.{type(err).__qualname__}: "
    return last.removeprefix(prefix)


class MissingFileError(GpoLitError):
    """A data file or folder the configuration points at does not exist."""


def not_a_file(path: object) -> str | None:
    """Why ``path`` is not a file (``"a folder"``, ``"no such folder"``, ``"no such file"``), or
    None when it is one."""
    from pathlib import Path

    p = Path(str(path))
    if p.is_file():
        return None
    if p.is_dir():
        return "a folder"
    return "no such folder" if not p.parent.is_dir() else "no such file"


def require_file(path: object, expected: str) -> None:
    """Raise :class:`MissingFileError` naming ``path`` unless it is an existing file (a plain
    :class:`GpoLitError` when it is a folder)."""
    found = not_a_file(path)
    if found == "a folder":
        raise GpoLitError(f"{path}: expected {expected}, found {found}")
    if found is not None:
        raise MissingFileError(f"{path}: expected {expected}, found {found}")
