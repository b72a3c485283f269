"""Writing files so that a crash or a concurrent writer never leaves half of one."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(
    path: str | Path, data: bytes | Callable[[BinaryIO], object], sync: bool = False
) -> Path:
    """Write ``data`` (bytes, or a function writing to a binary file) to ``path`` through a
    per-process temporary file in the same folder, then rename it over ``path``.

    ``os.replace`` is atomic on POSIX file systems: ``path`` holds the old or the new content,
    whole. ``sync`` flushes the data to disk before the rename (for records that claim other
    data is on disk, such as progress files).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # per process: ranks may race
    with open(tmp, "wb") as f:
        if isinstance(data, bytes):
            f.write(data)
        else:
            data(f)
        if sync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
