"""OmegaConf resolvers the configs use (registered on import; every entry point imports them
through ``gpo_lit.cli``).

- ``${gpo_lit.timm_data:BACKBONE,KEY}``: ``image_size``, ``mean``, ``std`` or ``interpolation``
  from timm's pretrained config of BACKBONE (``conf/data/transforms/backbone.yaml``).
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from gpo_lit.errors import GpoLitError


def timm_data(backbone: str, key: str) -> Any:
    """One image setting of a timm backbone's pretrained config (see the module docstring)."""
    from gpo_lit.encoders.timm_backbone import IMAGE_KEYS, backbone_image_config

    if key not in IMAGE_KEYS:
        raise GpoLitError(
            f"gpo_lit.timm_data: expected a key among {', '.join(IMAGE_KEYS)}, found {key!r}"
        )
    return backbone_image_config(str(backbone))[key]


if not OmegaConf.has_resolver("gpo_lit.timm_data"):
    OmegaConf.register_new_resolver("gpo_lit.timm_data", timm_data)
