"""Grid features from a timm CNN backbone, trained end to end (REFERENCE §2, §4).

The last feature map ``[B, C, H, W]`` is flattened row-major to a set ``[B, H·W, C]`` of grid
cells, projected by one ``Linear(C → d)`` (``fc``); pooling and l2-normalisation happen in the
model. BatchNorm statistics of the backbone stay frozen (eval mode) throughout; their affine
parameters train whenever the block trains. In training, "size augmentation" drops grid cells
(per image with p = 0.8, each cell with a per-image rate ~ U(0.04, 0.2]), packs the kept cells to
the front and returns the new lengths.

Weights never come from the network at run time (``encoders.timm_backbone``): ``pretrained=True``
reads timm's weights from the local Hugging Face cache (looked up, never requested),
``checkpoint_path`` reads a local file (e.g. the BUTD detector's ResNet-101 converted to a
torchvision-style state dict).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from gpo_lit.encoders.timm_backbone import create_timm_model
from gpo_lit.errors import GpoLitError


def grid_size_augment(
    feats: Tensor,
    p: float = 0.8,
    min_rate: float = 0.04,
    max_rate: float = 0.2,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Randomly drop grid cells of each image; kept cells packed to the front, in order.

    Args:
        feats: ``[B, N, C]`` full grids (every image has all N cells).
        p: probability that an image is augmented at all.
        min_rate, max_rate: an augmented image drops each cell with a rate drawn uniformly in
            ``(min_rate, max_rate]`` (the released code: ``0.2 · u`` with ``u ~ U(0.2, 1]``).
        generator: optional RNG (on ``feats.device``); default the global torch RNG.

    Returns:
        (``[B, max length, C]`` zero-padded, ``lengths [B]`` int64). An image whose cells would
        all be dropped keeps them all.
    """
    b, n, _ = feats.shape
    dev = feats.device
    augmented = torch.rand(b, device=dev, generator=generator) < p
    # rate in (min_rate, max_rate]: 1 - U[0, 1) lies in (0, 1]
    u = 1.0 - torch.rand(b, device=dev, generator=generator)
    rate = min_rate + (max_rate - min_rate) * u
    drop = torch.rand(b, n, device=dev, generator=generator) < rate[:, None]
    keep = ~(drop & augmented[:, None])
    keep[keep.sum(1) == 0] = True  # never an empty set
    lengths = keep.sum(1)
    # stable sort puts kept cells first, in their original (row-major) order
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    packed = torch.gather(feats, 1, order[..., None].expand_as(feats))
    max_len = int(lengths.max())
    packed = packed[:, :max_len]
    valid = torch.arange(max_len, device=dev)[None, :] < lengths[:, None]
    packed = packed * valid[..., None].to(packed.dtype)  # padding is exactly zero
    return packed, lengths


def stride_in_1x1(model: nn.Module) -> int:
    """Move each bottleneck's stride from its 3×3 convolution to its first 1×1 (in place).

    PyTorch / timm ResNets stride on the 3×3 (``conv2``); the original Caffe ResNets — the BUTD
    detector's ResNet-101 among them — stride on the 1×1 (``conv1``). Same weights, different
    features: Caffe-converted weights need the Caffe placement. Returns the blocks changed.
    """
    changed = 0
    for block in model.modules():
        conv1, conv2, conv3 = (getattr(block, f"conv{i}", None) for i in (1, 2, 3))
        if not all(isinstance(c, nn.Conv2d) for c in (conv1, conv2, conv3)):
            continue  # stems and basic blocks
        assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)  # for the checker
        if conv1.kernel_size == (1, 1) and conv2.stride != (1, 1):
            conv1.stride, conv2.stride = conv2.stride, (1, 1)
            changed += 1
    return changed


def create_backbone(
    backbone: str,
    pretrained: bool,
    checkpoint_path: str | None,
    out_index: int,
    backbone_kwargs: dict | None,
    weights_hint: str = "",
) -> nn.Module:
    """A timm model returning one feature map (``features_only``), weights from local files only."""
    return create_timm_model(
        backbone,
        pretrained,
        checkpoint_path,
        backbone_kwargs,
        weights_hint,
        features_only=True,
        out_indices=(out_index,),
    )


class GridCellEncoder(nn.Module):
    """Grid cells or tokens ``[B, N, C]`` → ``Linear(C → d)`` set, size augmentation in training.

    The head of :class:`GridEncoder` and of the ViT encoder (``encoders.vit``), and on its own the
    visual encoder for cells / tokens precomputed by ``make features``
    (``model/visual=grid_precomp`` or ``vit_precomp``): the same ``fc`` and the same dropping as
    end to end, the backbone fixed.

    Args:
        in_dim: cell (token) width C.
        embed_dim: joint embedding width d.
        size_augment: drop cells / tokens in training (REFERENCE §4, §12).
        augment_p, augment_min_rate, augment_max_rate: size augmentation parameters.
        xavier_init: ``fc`` weight Xavier-uniform and bias zero (PCME++'s towers, REFERENCE §12);
            off = PyTorch's default ``nn.Linear`` initialisation.
    """

    def __init__(
        self,
        in_dim: int = 2048,
        embed_dim: int = 1024,
        size_augment: bool = True,
        augment_p: float = 0.8,
        augment_min_rate: float = 0.04,
        augment_max_rate: float = 0.2,
        xavier_init: bool = False,
    ) -> None:
        super().__init__()
        self.in_dim = in_dim
        self.fc = nn.Linear(in_dim, embed_dim)
        if xavier_init:
            nn.init.xavier_uniform_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
        self.size_augment = size_augment
        self.augment = (augment_p, augment_min_rate, augment_max_rate)

    def forward(self, cells: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """cells ``[B, N, C]`` (whole grids; ``lengths`` is ignored) → (``[B, N', d]``
        zero-padded, ``lengths [B]``)."""
        b, n, _ = cells.shape
        if self.training and self.size_augment:
            p, lo, hi = self.augment
            cells, out_len = grid_size_augment(cells, p, lo, hi)
            out = self.fc(cells)
            valid = torch.arange(out.shape[1], device=out.device)[None, :] < out_len[:, None]
            return out * valid[..., None].to(out.dtype), out_len
        return self.fc(cells), torch.full((b,), n, dtype=torch.long, device=cells.device)


class GridEncoder(GridCellEncoder):
    """CNN grid cells → ``Linear(C → d)`` set (REFERENCE §2), with size augmentation (§4).

    Args:
        backbone: timm model name (default the WSL ResNeXt-101 32×8d of the paper).
        embed_dim: joint embedding width d.
        pretrained: load timm's pretrained weights from the local HF cache.
        checkpoint_path: load the backbone from this local file instead (torchvision / timm
            state dict; implies ``pretrained``).
        backbone_kwargs: extra ``timm.create_model`` kwargs (tests pass tiny sizes).
        size_augment: drop grid cells in training (REFERENCE §4).
        freeze_bn: keep the backbone's BatchNorm statistics frozen (eval mode) always.
        channels_last: run the backbone in channels-last memory format (faster with bf16 on GPU).
        grad_checkpointing: recompute backbone activations in backward (saves memory).
        out_index: which feature level (-1 = the last, stride 32 = layer4).
        augment_p, augment_min_rate, augment_max_rate: size augmentation parameters.
        caffe_stride: stride on each bottleneck's first 1×1 convolution, as Caffe ResNets do
            (the BUTD detector's weights); off = PyTorch placement (on the 3×3).
        weights_hint: appended to a missing ``checkpoint_path`` error (where the file comes from).
    """

    def __init__(
        self,
        backbone: str = "resnext101_32x8d.fb_wsl_ig1b_ft_in1k",
        embed_dim: int = 1024,
        pretrained: bool = True,
        checkpoint_path: str | None = None,
        backbone_kwargs: dict | None = None,
        size_augment: bool = True,
        freeze_bn: bool = True,
        channels_last: bool = False,
        grad_checkpointing: bool = False,
        out_index: int = -1,
        augment_p: float = 0.8,
        augment_min_rate: float = 0.04,
        augment_max_rate: float = 0.2,
        caffe_stride: bool = False,
        weights_hint: str = "",
    ) -> None:
        net: Any = create_backbone(  # a timm model: feature_info, set_grad_checkpointing
            backbone, pretrained, checkpoint_path, out_index, backbone_kwargs, weights_hint
        )
        if caffe_stride and stride_in_1x1(net) == 0:
            raise GpoLitError(
                f"model.visual.caffe_stride: expected a bottleneck ResNet, found no strided "
                f"bottleneck in '{backbone}'"
            )
        channels = int(net.feature_info.channels()[-1])
        super().__init__(
            channels, embed_dim, size_augment, augment_p, augment_min_rate, augment_max_rate
        )
        self.backbone = net
        self.reduction = int(net.feature_info.reduction()[-1])
        self.backbone_name = backbone
        self.freeze_bn = freeze_bn
        self.channels_last = channels_last
        if channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        if grad_checkpointing:
            self.backbone.set_grad_checkpointing(True)
        if freeze_bn:
            self._bn_eval()

    def _bn_eval(self) -> None:
        for m in self.backbone.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def train(self, mode: bool = True) -> GridEncoder:
        super().train(mode)
        if self.freeze_bn:
            self._bn_eval()
        return self

    def grid(self, images: Tensor, pool_grid: int | None = None) -> Tensor:
        """images ``[B, 3, H, W]`` → backbone cells ``[B, h·w, C]`` in row-major order.

        ``pool_grid=g`` average-pools the feature map to g×g cells first (fixed-count features
        for the extractor); the model itself always uses every cell.
        """
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        fmap = self.backbone(images)[-1]
        if fmap.ndim == 3:  # token models: already a set
            if pool_grid is not None:
                raise GpoLitError(
                    f"extract.pool_grid: expected a CNN feature map [B, C, H, W] to pool, found "
                    f"tokens {tuple(fmap.shape)} from '{self.backbone_name}'"
                )
            return fmap
        if pool_grid is not None:
            side = min(fmap.shape[-2:])
            if pool_grid > side:  # adaptive pooling would repeat cells, not pool them
                raise GpoLitError(
                    f"extract.pool_grid: expected at most {side} (the side of "
                    f"'{self.backbone_name}''s {fmap.shape[-2]}×{fmap.shape[-1]} feature map), "
                    f"found {pool_grid}"
                )
            fmap = nn.functional.adaptive_avg_pool2d(fmap, pool_grid)
        return fmap.flatten(2).transpose(1, 2)

    def forward(self, images: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """images ``[B, 3, H, W]`` (``lengths`` is ignored: every image is whole) →
        (``[B, N, d]`` zero-padded cells, ``lengths [B]``)."""
        return super().forward(self.grid(images))
