"""``model.compile=true``: ``torch.compile`` of the encoders and pooling heads, off by default.

Each module is compiled in place (:meth:`torch.nn.Module.compile`), so its parameters, its
``state_dict`` keys and therefore the checkpoints are those of the eager model; only the forward
passes run through TorchDynamo and the chosen backend. The loss and the evaluation ranking stay
eager, and so do GPO's CPU kernels inside a compiled pooling head (``torch.compiler.disable``
on them: numpy sorts and Python loops that tracing would only split into graphs). Set sizes
differ from batch to batch, so expect a few recompilations before shapes are marked dynamic.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpo_lit.errors import expect


def compile_backends() -> list[str]:
    """The ``torch.compile`` backends of this torch (``inductor``, …) and the two debug ones that
    exercise the wrapping without generating code (``eager``, ``aot_eager``)."""
    from torch._dynamo import list_backends

    return sorted({*list_backends(), "eager", "aot_eager"})


def compile_modules(modules: Iterable[nn.Module | None], backend: str) -> None:
    """Compile every module given (None entries skipped) in place with ``backend``, or one line
    naming ``model.compile_backend`` if this torch has no such backend."""
    expect(
        hasattr(torch, "compile"), "model.compile", "a torch with torch.compile", torch.__version__
    )
    names = compile_backends()
    expect(backend in names, "model.compile_backend", f"one of {', '.join(names)}", backend)
    for module in modules:
        if module is not None:
            module.compile(backend=backend)
