"""Writing files so that a crash, a full disk or a concurrent writer never leaves half of one."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from gpo_lit.errors import GpoLitError, expect

DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def human(n: float) -> str:
    """``n`` bytes as ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex: what identifies a file whose path stayed the same."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ensure_new(path: str | Path, hint: str = "") -> None:
    """Refuse, in one line naming ``path``, to write where a file exists: results, checkpoints,
    features and reports are never clobbered (``hint``: how to get past it)."""
    if Path(path).exists():
        more = f"; {hint}" if hint else ""
        raise GpoLitError(
            f"{path}: expected a new file, found an existing one (not overwritten{more})"
        )


def require_folder(path: str | Path, where: object) -> None:
    """Refuse, in one line, a folder to write into that is a file or lies under one (before any
    work: ``mkdir`` would fail only at the first write)."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            expect(p.is_dir(), where, "a folder", f"a file, {p}")
            return


def free_space(path: str | Path) -> int:
    """Bytes free for an unprivileged writer on the file system that holds (or will hold) ``path``."""
    folder = Path(path).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(path: str | Path, needed: int, what: str) -> None:
    """Refuse, in one line naming ``path``, to write ``needed`` bytes where fewer are free."""
    free = free_space(path)
    if free < needed:
        raise GpoLitError(
            f"{path}: expected {human(needed)} free disk space for {what}, found {human(free)} "
            "free; free some space or write elsewhere"
        )


def disk_full_error(path: str | Path, err: OSError, needed: int | None, what: str) -> GpoLitError:
    """The one-line error for an ENOSPC / EDQUOT raised while writing ``path``."""
    size = f"{human(needed)} " if needed is not None else ""
    return GpoLitError(
        f"{path}: expected {size}free disk space for {what}, found the disk full "
        f"({os.strerror(err.errno or errno.ENOSPC)}; {human(free_space(path))} free); free "
        "some space or write elsewhere"
    )


def reserve(path: str | Path, size: int, what: str) -> None:
    """Allocate ``size`` bytes of the existing file ``path`` on disk now (a sparse file that
    fills up later dies with SIGBUS when it is memory-mapped); one line if the disk is full."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows: the free-space check must do
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno in DISK_FULL:
                raise disk_full_error(path, err, size, what) from None
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it
                raise


def write_atomic(
    path: str | Path,
    data: bytes | Callable[[BinaryIO], object],
    sync: bool = False,
    *,
    needed: int | None = None,
    what: str = "it",
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` through a
    per-process temporary file in the same folder, then rename it over ``path``.

    ``os.replace`` is atomic on POSIX file systems: ``path`` holds the old or the new content,
    whole. ``sync`` flushes the data to disk before the rename (for records that claim other
    data is on disk, such as progress files). On any failure the temporary file is removed; a
    full disk is one line naming ``path`` (``needed``, ``what``: the size and what it is).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may race
    try:
        with open(tmp, "wb") as f:
            if isinstance(data, bytes):
                f.write(data)
            else:
                data(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            raise disk_full_error(path, err, needed, what) from None
        raise
    return path
