"""Every output token of a timm Vision Transformer as the visual set (REFERENCE §12).

CLIP ViT-B/32, B/16, L/14 image towers (``vit_base_patch16_clip_224.openai``, the
``*_clip_quickgelu_*`` variants with OpenAI's activation), DINOv2 (with or without registers),
SigLIP, EVA: any timm model with ``forward_intermediates``. The set is the output of one block
(the last by default) for every position — prefix tokens (CLS, registers) first when kept, then
the patches in row-major order — taken before the final LayerNorm and without the projection /
classifier, as PCME++ does: ``forward_intermediates(x, indices=[out_index], norm=False,
output_fmt="NLC", return_prefix_tokens=True)``. The blocks after ``out_index``, the unused final
norm and the head are removed from the model, so every parameter it holds gets a gradient.

Head and augmentation are the grid encoder's (:class:`~gpo_lit.encoders.grid.GridCellEncoder`):
``Linear(width → d)`` (Xavier, zero bias, as PCME++), and in training token size augmentation —
80 % of images drop each token with rate 0.2·u, u ~ U(0.2, 1] per image, the CLS token
included — kept tokens packed to the front with their lengths. Pooling and l2norm happen in the
model. Weights come from local files only (``encoders.timm_backbone``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from gpo_lit.encoders.grid import GridCellEncoder
from gpo_lit.encoders.timm_backbone import create_timm_model
from gpo_lit.errors import GpoLitError


class ViTEncoder(GridCellEncoder):
    """timm ViT tokens ``[B, P + N, width]`` → ``Linear(width → d)`` set, with token dropping.

    Args:
        backbone: timm model name with its pretrained tag.
        embed_dim: joint embedding width d.
        pretrained: load timm's pretrained weights from the local HF cache.
        checkpoint_path: load the backbone from this local file instead (a timm state dict).
        backbone_kwargs: extra ``timm.create_model`` kwargs (``img_size``, ``dynamic_img_size``;
            tests pass tiny sizes).
        prefix_tokens: keep the prefix tokens (CLS, registers) in the set (PCME++: yes).
        norm: apply the backbone's final LayerNorm to the tokens (PCME++: no).
        out_index: the block whose output is the set (-1 = the last).
        size_augment: drop tokens in training (REFERENCE §12).
        grad_checkpointing: recompute block activations in backward (saves memory).
        augment_p, augment_min_rate, augment_max_rate: size augmentation parameters.
        xavier_init: see :class:`GridCellEncoder`.
        weights_hint: appended to a missing ``checkpoint_path`` error.
    """

    def __init__(
        self,
        backbone: str = "vit_base_patch16_clip_224.openai",
        embed_dim: int = 1024,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict | None = None,
        prefix_tokens: bool = True,
        norm: bool = False,
        out_index: int = -1,
        size_augment: bool = True,
        grad_checkpointing: bool = False,
        augment_p: float = 0.8,
        augment_min_rate: float = 0.04,
        augment_max_rate: float = 0.2,
        xavier_init: bool = True,
        weights_hint: str = "",
    ) -> None:
        # Any: timm's ViT-like classes (VisionTransformer, Eva, …) share these methods, no base
        net: Any = create_timm_model(
            backbone, pretrained, checkpoint_path, backbone_kwargs, weights_hint, num_classes=0
        )
        if not all(
            hasattr(net, a)
            for a in ("forward_intermediates", "prune_intermediate_layers", "blocks", "embed_dim")
        ):
            raise GpoLitError(
                f"model.visual.backbone: expected a timm Vision Transformer (a token model with "
                f"forward_intermediates), found '{backbone}' ({type(net).__name__}); CNNs use "
                f"model/visual=grid"
            )
        depth = len(net.blocks)
        if not -depth <= out_index < depth:
            raise GpoLitError(
                f"model.visual.out_index: expected a block index in [-{depth}, {depth - 1}] of "
                f"'{backbone}', found {out_index}"
            )
        # blocks after out_index, the final norm (unless applied) and the head never run
        net.prune_intermediate_layers([out_index], prune_norm=not norm, prune_head=True)
        super().__init__(
            int(net.embed_dim),
            embed_dim,
            size_augment,
            augment_p,
            augment_min_rate,
            augment_max_rate,
            xavier_init,
        )
        self.backbone = net
        self.backbone_name = backbone
        self.prefix_tokens = prefix_tokens
        self.norm = norm
        self.num_prefix_tokens = int(getattr(net, "num_prefix_tokens", 0)) if prefix_tokens else 0
        if grad_checkpointing:
            net.set_grad_checkpointing(True)

    def grid(self, images: Tensor, pool_grid: int | None = None) -> Tensor:
        """images ``[B, 3, H, W]`` → backbone tokens ``[B, P + N, width]`` (P prefix tokens when
        kept, then the N patches row-major): the set before the head, as ``make features``
        stores it. ``pool_grid`` is for CNN maps only."""
        if pool_grid is not None:
            raise GpoLitError(
                f"extract.pool_grid: expected a CNN feature map [B, C, H, W] to pool, found the "
                f"tokens of '{self.backbone_name}' (leave extract.pool_grid=null)"
            )
        backbone: Any = self.backbone
        (out,) = backbone.forward_intermediates(
            images,
            indices=[-1],  # the last block left after pruning = out_index
            norm=self.norm,
            output_fmt="NLC",
            return_prefix_tokens=True,
            intermediates_only=True,
        )
        if not isinstance(out, tuple):  # no prefix tokens (SigLIP)
            return out
        patches, prefix = out
        return torch.cat([prefix, patches], dim=1) if self.prefix_tokens else patches

    def forward(self, images: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images ``[B, 3, H, W]`` (``lengths`` is ignored: every image is whole) →
        (``[B, N', d]`` zero-padded tokens, ``lengths [B]``)."""
        return super().forward(self.grid(images))
