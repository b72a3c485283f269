"""One exception type for user-facing problems (bad files, bad config values).

Its message is a single line naming the file or option, what was expected and what was found; the
entry points print it without a traceback and exit with status 2.
"""

from __future__ import annotations

import re


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


class UnsafeCheckpointError(GpoLitError):
    """A checkpoint whose stored configs would make loading it run code that is not gpo_lit's.

    Callers that note unreadable checkpoints and go on (the report) re-raise this one.
    """


# Advice in torch's and numpy's messages to load with pickle enabled; never repeated to users.
_UNSAFE_ADVICE = re.compile(
    r"weights_only\W*(?:argument\W*)?(?:set to|=)\W*false|allow_pickle\W*=\W*true|\btrust",
    re.IGNORECASE,
)


def first_line(err: BaseException, limit: int = 200) -> str:
    """``"<Type>: <first line of the message>"`` (``"<Type>"`` without a message) for one-line
    errors: a line over ``limit`` characters is cut to its first sentence, then to ``limit``;
    sentences advising to load with ``weights_only=False`` / ``allow_pickle=True`` are dropped."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    sentences = re.split(r"(?<=[.!?])\s+", text)
    text = " ".join(s for s in sentences if not _UNSAFE_ADVICE.search(s))
    if len(text) > limit:
        text = re.split(r"(?<=[.!?])\s+", text)[0]
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def user_error(err: BaseException) -> GpoLitError | None:
    """The GpoLitError behind ``err`` (Hydra wraps errors raised while instantiating, OmegaConf
    those raised by a config resolver)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import InterpolationResolutionError

    cur: BaseException | None = err
    while cur is not None:
        if isinstance(cur, GpoLitError):
            return cur
        if isinstance(cur, InstantiationException):
            cur = cur.__cause__
        elif isinstance(cur, InterpolationResolutionError):
            cur = cur.__cause__ or cur.__context__
        else:
            cur = None
    return None
