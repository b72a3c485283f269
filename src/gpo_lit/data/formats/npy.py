"""``.npy`` files read without ``np.load``: the header alone (checked), and rows by positioned reads.

Rows are read with positioned reads (``os.preadv`` into a preallocated array, from the header's
data offset): only the requested bytes come off the disk. A memory map read 25x the bytes of a
random row on a cold page cache (kernel read-ahead) and counted gigabytes of file pages in every
RSS figure.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gpo_lit.errors import GpoLitError, expect, require_file


def read_npy_header(path: str | Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Return ``(shape, dtype, fortran_order, data_offset)`` of a ``.npy`` file from its header alone.

    Also checks that the file is long enough to hold the array it announces (a truncated download
    otherwise fails later inside ``np.load`` with a message that names no file).
    """
    path = Path(path)
    require_file(path, "a .npy file")
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise GpoLitError(
                    f"{path}: expected a .npy file of format version 1.0 or 2.0, "
                    f"found version {version[0]}.{version[1]}"
                )
        except GpoLitError:
            raise
        except Exception as e:  # bad magic, short or unparsable header (ValueError, TokenError...)
            reason = (str(e).splitlines() or [""])[0] if isinstance(e, ValueError) else ""
            reason = reason or f"an unparsable header ({type(e).__name__})"
            raise GpoLitError(f"{path}: expected a .npy array file, found {reason}") from None
        offset = f.tell()
    if dtype.hasobject:  # its data is a pickle: never loaded, and its size means nothing
        raise GpoLitError(
            f"{path}: expected an array of numbers (read without unpickling), found dtype "
            f"{dtype} (pickled Python objects)"
        )
    n_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    have = os.path.getsize(path) - offset
    expect(
        have >= n_bytes,
        path,
        f"{n_bytes} bytes of data for shape {tuple(shape)} {dtype}",
        f"{have} (truncated file?)",
    )
    return tuple(shape), dtype, fortran, offset


def pread_into(fd: int, buf: np.ndarray, offset: int, path: Path) -> None:
    """Fill the uint8 array ``buf`` from ``fd`` at ``offset`` (positioned reads: no shared file
    position, so threads and forked workers never disturb one another)."""
    view, done = buf.data, 0  # memoryview(buf), which numpy's stubs reject before Python 3.12
    while done < len(view):  # one read returns at most ~2 GiB on Linux; loop on short reads
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # platforms without preadv (Windows has neither; macOS < 11)
            data = os.pread(fd, len(view) - done, offset + done)
            n = len(data)
            view[done : done + n] = data
        if n == 0:
            raise GpoLitError(
                f"{path}: expected {len(view)} bytes at offset {offset}, found the end of the "
                "file (truncated while in use?)"
            )
        done += n
