"""timm backbones from local files only: the Hugging Face cache (looked up, never requested) or a
weights file the user names; and the image settings of a backbone's pretrained config.

Shared by the CNN grid encoder (``encoders.grid``) and the ViT token-set encoder
(``encoders.vit``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from gpo_lit.errors import GpoLitError, first_line


def _missing_weights(backbone: str, err: Exception, repo: str | None = None) -> GpoLitError:
    """One line: where the weights were looked for and the Hub repo to download them from
    (``repo``: the pretrained config's ``hf_hub_id``; variants such as ``*_quickgelu_*`` share
    another model's repo)."""
    cache = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return GpoLitError(
        f"model.visual.backbone: expected pretrained weights of '{backbone}' in the local Hugging "
        f"Face cache ({cache}/hub; no network is used), found none ({type(err).__name__}); "
        f"download them once with `huggingface-cli download {repo or 'timm/' + backbone}`, or set "
        f"model.visual.checkpoint_path=<local .pth/.safetensors file>"
    )


def cached_timm_weights(backbone: str) -> Path:
    """The local Hugging Face cache file of timm's pretrained ``backbone`` weights.

    Looked up in the cache only (``try_to_load_from_cache``): no request is ever made, whatever
    ``HF_HUB_OFFLINE`` says. A model or tag without Hub weights, or weights not in the cache, is
    a one-line error saying how to get them.
    """
    import timm
    from huggingface_hub import try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    if not timm.is_model(backbone.split(".")[0]):
        raise GpoLitError(f"model.visual.backbone: expected a timm model name, found '{backbone}'")
    try:
        cfg = get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError, KeyError):
        cfg = None  # an unknown tag: no weights to find
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if repo:
        names = (getattr(cfg, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin")
        for name in filter(None, names):
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return Path(found)
    raise _missing_weights(
        backbone, FileNotFoundError(repo or "no Hugging Face Hub weights"), repo or None
    )


def load_state_file(path: Path) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` or torch file (``weights_only=True``), unwrapped from
    ``{"state_dict": …}`` / ``{"model": …}`` containers."""
    sd: Any
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise GpoLitError(
                f"{path}: expected a safetensors state dict, found {first_line(err, 160)}"
            ) from None
    else:
        from gpo_lit.checkpoint_io import load_torch_file

        sd = load_torch_file(path, "a state dict of tensors")
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise GpoLitError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return {k: v for k, v in sd.items() if isinstance(v, Tensor)}


# prefixes stripped from checkpoint keys (DataParallel, the authors' grid checkpoints, timm wraps)
_PREFIXES = ("module.", "backbone.resnet.", "resnet.", "backbone.", "model.")


def _strip(key: str) -> str:
    """``key`` without any leading wrapper prefixes (``module.backbone.resnet.conv1.weight``)."""
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix) :], True
    return key


def load_backbone_weights(model: nn.Module, path: Path, backbone: str) -> None:
    """Load ``path`` into ``model`` (a features-only timm model): every backbone tensor must be
    found (classifier and other extra keys are ignored)."""
    sd = load_state_file(path)
    want = model.state_dict()
    stripped = {_strip(k): v for k, v in sd.items()}
    if sum(k in want for k in stripped) > sum(k in want for k in sd):  # only when it helps
        sd = stripped
    missing = [k for k in want if k not in sd and not k.endswith("num_batches_tracked")]
    bad = [k for k in want if k in sd and sd[k].shape != want[k].shape]
    if missing or bad:
        what = f"{len(missing)} missing (e.g. {missing[0]})" if missing else ""
        what += ("; " if what else "") + (
            f"{len(bad)} of another shape (e.g. {bad[0]})" if bad else ""
        )
        raise GpoLitError(
            f"{path}: expected the weights of timm '{backbone}' ({len(want)} tensors), found {what}"
        )
    model.load_state_dict({k: sd[k] for k in want if k in sd}, strict=False)


def create_timm_model(
    backbone: str,
    pretrained: bool,
    checkpoint_path: str | None,
    backbone_kwargs: dict | None = None,
    weights_hint: str = "",
    **create_kwargs: Any,
) -> nn.Module:
    """``timm.create_model(backbone, **create_kwargs, **backbone_kwargs)``, weights from local
    files only.

    Args:
        backbone: timm model name, optionally with a pretrained tag (``name.tag``).
        pretrained: load timm's pretrained weights from the local Hugging Face cache.
        checkpoint_path: load this local state dict instead (every tensor of the model must be
            found in it; wrapper prefixes such as ``module.`` are stripped).
        backbone_kwargs: the user's extra ``create_model`` kwargs (override ``create_kwargs``).
        weights_hint: appended to a missing ``checkpoint_path`` error (where the file comes from).
        create_kwargs: what the calling encoder needs (``features_only``, ``num_classes``, …).
    """
    import timm

    kwargs = {**create_kwargs, **(backbone_kwargs or {})}
    if pretrained and checkpoint_path is None:
        # timm's own loader, pointed at the cached file: it applies the model's checkpoint filter
        cached = cached_timm_weights(backbone)
        kwargs["pretrained_cfg_overlay"] = {"file": str(cached), "hf_hub_id": None, "url": None}
    try:
        model = timm.create_model(
            backbone, pretrained=pretrained and checkpoint_path is None, **kwargs
        )
    except (RuntimeError, ValueError, TypeError) as err:
        raise GpoLitError(
            f"model.visual.backbone: expected a timm model name (and kwargs it takes), found "
            f"{first_line(err)}"
        ) from None
    if checkpoint_path is not None:
        path = Path(checkpoint_path)
        if not path.is_file():
            raise GpoLitError(
                f"model.visual.checkpoint_path: expected a weights file for '{backbone}', found "
                f"no such file at {path}" + (f"; {weights_hint}" if weights_hint else "")
            )
        load_backbone_weights(model, path, backbone)
    return model


#: the image settings a backbone's pretrained config gives (``data/transforms=backbone``)
IMAGE_KEYS = ("image_size", "mean", "std", "interpolation")


def backbone_image_config(backbone: str) -> dict[str, Any]:
    """``image_size``, ``mean``, ``std``, ``interpolation`` of timm's pretrained config of
    ``backbone`` (``timm.data.resolve_data_config``): what the backbone was trained on.

    Read from timm's model registry, never from the network. The crop (``crop_pct``) is left
    out: the retrieval recipes resize whole images (REFERENCE §4, §12).
    """
    import timm
    from timm.data import resolve_data_config
    from timm.models import get_pretrained_cfg

    if not timm.is_model(backbone.split(".")[0]):
        raise GpoLitError(f"model.visual.backbone: expected a timm model name, found '{backbone}'")
    try:
        cfg = get_pretrained_cfg(backbone)
    except (RuntimeError, ValueError, KeyError) as err:
        raise GpoLitError(
            f"model.visual.backbone: expected a timm model with a pretrained config, found "
            f"'{backbone}' ({first_line(err)})"
        ) from None
    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if cfg is not None else {})
    return {
        "image_size": int(data["input_size"][-1]),
        "mean": [float(v) for v in data["mean"]],
        "std": [float(v) for v in data["std"]],
        "interpolation": str(data["interpolation"]),
    }
