"""Reading and writing checkpoints safely.

Reading: :func:`load_torch_file` is the one ``torch.load`` of the project (``weights_only=True``:
tensors and plain values only, never arbitrary unpickling); :func:`read_checkpoint` adds the
checks of a gpo_lit checkpoint (its entries, the components its configs name, the file paths its
callback state holds); :func:`check_state_dict` compares stored weights with a model's.
Writing: :class:`AtomicCheckpointIO`, whose saves a kill or a full disk never half-writes (the
previous checkpoint is kept) and whose loads (the ones Lightning does when resuming or testing
``ckpt_path=best``) go through the same reader.
"""

from __future__ import annotations

import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from gpo_lit.errors import GpoLitError, first_line, require_file
from gpo_lit.files import check_free_space, write_atomic

# ModelCheckpoint state entries naming files that Lightning may delete or load after a resume.
_CALLBACK_PATHS = ("best_model_path", "kth_best_model_path", "last_model_path")


def load_torch_file(
    path: str | Path,
    expected: str,
    *,
    mmap: bool = False,
    safe_globals: Iterable[type] = (),
    map_location: Any = "cpu",
) -> Any:
    """``torch.load(path, weights_only=True)``, or one :class:`GpoLitError` line
    ``<path>: expected <expected>, found <what the file is>``.

    ``mmap`` maps the tensors instead of reading them (zip checkpoints; cheap checks of large
    files); ``safe_globals`` are the classes besides tensors and plain values the file may hold.
    """
    path = Path(path)
    require_file(path, expected)
    with open(path, "rb") as f:
        head = f.read(8)
    is_zip = head.startswith(b"PK\x03\x04")
    found = None
    if not head:
        found = "an empty file"
    elif head.startswith(b"\x93NUMPY"):
        found = "a numpy .npy array, not a torch file"
    elif is_zip and not zipfile.is_zipfile(path):
        found = "a truncated or corrupt file (a zip archive without its end record)"
    elif is_zip and not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist()):
        found = "a zip archive that is not a torch file (no data.pkl)"
    elif not is_zip and not head.startswith(b"\x80"):
        found = f"a file that is not a torch file (it starts with {head!r})"
    if found is not None:
        raise GpoLitError(f"{path}: expected {expected}, found {found}")
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            # a plain pickle gets a warning before the refusal: the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(
                path, map_location=map_location, weights_only=True, mmap=mmap and is_zip
            )
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise GpoLitError(f"{path}: expected {expected}, found {_unreadable(err)}") from None


def _unreadable(err: BaseException) -> str:
    """What torch's refusal means, without its advice to load with pickle enabled."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    if refused:
        return (
            f"an object that only unpickling can build ({refused.group(1)}; a checkpoint holds "
            "tensors and plain values only)"
        )
    if isinstance(err, pickle.UnpicklingError):
        return "pickle data that is not a torch checkpoint"
    return f"a corrupt file ({first_line(err)})"


def read_checkpoint(
    path: str | Path,
    entries: Iterable[str] = ("hyper_parameters", "state_dict"),
    *,
    mmap: bool = False,
    expected: str = "a gpo_lit checkpoint",
) -> dict[str, Any]:
    """A checkpoint with ``entries``, its stored configs and callback state checked (one line
    naming ``path`` otherwise); nothing in it is built or called."""
    from gpo_lit.components import check_stored_configs

    ckpt = load_torch_file(path, f"{expected} (tensors and plain values only)", mmap=mmap)
    if not isinstance(ckpt, dict):
        what = type(ckpt).__name__
        if isinstance(ckpt, torch.Tensor):
            what = f"a saved tensor of shape {list(ckpt.shape)}"
        raise GpoLitError(f"{path}: expected {expected} (a dict of entries), found {what}")
    missing = [e for e in entries if e not in ckpt]
    if missing:
        keys = ", ".join(map(repr, sorted(map(str, ckpt))[:8])) or "none"
        raise GpoLitError(
            f"{path}: expected {expected} with entries {', '.join(entries)}, found no "
            f"{', '.join(missing)} (its entries: {keys})"
        )
    for entry in ("hyper_parameters", "state_dict", "gpo_lit_config"):
        if entry in ckpt and not isinstance(ckpt[entry], dict | type(None)):
            raise GpoLitError(
                f"{path}: expected a dict in '{entry}', found {type(ckpt[entry]).__name__}"
            )
    check_stored_configs(path, ckpt)
    _check_callback_paths(path, ckpt.get("callbacks"))
    return ckpt


def _check_callback_paths(path: Path | str, callbacks: Any) -> None:
    """ModelCheckpoint state names files inside its own ``dirpath`` only: after a resume
    Lightning deletes superseded checkpoints and tests ``best_model_path``."""
    if not isinstance(callbacks, dict):
        return
    for name, state in callbacks.items():
        if not isinstance(state, dict) or not any(k in state for k in _CALLBACK_PATHS):
            continue
        dirpath = state.get("dirpath")
        files = [state.get(k) for k in _CALLBACK_PATHS]
        files += list(state.get("best_k_models") or {})
        for file in files:
            if file in (None, ""):
                continue
            inside = (
                isinstance(file, str)
                and isinstance(dirpath, str)
                and ".." not in Path(file).parts
                and Path(file).parent == Path(dirpath)
            )
            if not inside:
                raise GpoLitError(
                    f"{path}: expected the checkpoint files its callback state names to lie in "
                    f"that callback's dirpath ({dirpath!r}), found {str(file)[:120]!r} in "
                    f"callbacks[{str(name)[:60]!r}]"
                )


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def check_state_dict(
    where: object, expected: str, model_state: Mapping[str, torch.Tensor], stored: Mapping
) -> None:
    """Raise one line naming the first differing keys and shapes unless ``stored`` has exactly
    the keys of ``model_state``, with the same shapes, and no NaN/inf where the model has none
    (a diverged run's weights: found here, not after a whole split is embedded)."""
    missing = [k for k in model_state if k not in stored]
    unexpected = [k for k in stored if k not in model_state]
    problems = []

    def some(keys: list, what: str) -> None:
        if keys:
            more = f" (+{len(keys) - 2} more)" if len(keys) > 2 else ""
            problems.append(f"{what} {', '.join(repr(str(k)) for k in keys[:2])}{more}")

    some(missing, "no")
    some(unexpected, "the unexpected")
    for key, value in stored.items():
        if key not in model_state:
            continue
        if not isinstance(value, torch.Tensor):
            problems.append(f"a {type(value).__name__} at {key!r}")
        elif value.shape != model_state[key].shape:
            problems.append(
                f"{key!r} of shape {list(value.shape)} where the model has "
                f"{list(model_state[key].shape)}"
            )
        elif value.is_floating_point() and not _finite(value) and _finite(model_state[key]):
            problems.append(f"NaN/inf in {key!r}")  # where the model's own value is finite
        if len(problems) >= 3:
            break
    if problems:
        raise GpoLitError(f"{where}: expected {expected}, found {'; '.join(problems)}")


def tensor_bytes(obj: Any) -> int:
    """The bytes of every tensor storage in a checkpoint (each shared storage once): what
    ``torch.save`` writes, give or take its small metadata."""
    seen: dict[int, int] = {}

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list | tuple):
            for v in x:
                walk(v)

    walk(obj)
    return sum(seen.values())


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` streamed into a temporary file beside ``path``, flushed to disk, then
    renamed over ``path`` (:func:`gpo_lit.files.write_atomic`); read with
    :func:`load_torch_file` (``weights_only=True`` whatever Lightning asks).

    ``os.replace`` is atomic on POSIX file systems, so ``path`` always holds either the previous
    complete checkpoint or the new complete one. Unlike Lightning's own save (the whole
    checkpoint serialised in memory, then staged through ``$TMPDIR``), nothing is written
    elsewhere and no second copy is held in memory. Too little free space is refused before
    writing, a disk that fills up during the write removes the temporary file; both are one line
    naming the checkpoint, the space needed and the space free.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        needed = tensor_bytes(checkpoint) + 2**20  # + the pickled structure and zip records
        what = "the checkpoint (the previous one is kept)"
        check_free_space(path, needed, what)
        write_atomic(path, lambda f: torch.save(checkpoint, f), sync=True, needed=needed, what=what)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return load_torch_file(path, "a Lightning checkpoint", map_location=map_location)
