"""How long an epoch takes and how much memory a rank needs, from per-step costs counted here.

    python bench/scale_model.py [--gpu a100] [--mfu 0.35] [--batch 128]

Counted on this machine (no GPU needed) by running each recipe's real modules on the ``meta``
device: forward FLOPs per training pair (``torch.utils.flop_counter``; ResNeXt-101 32×8d at 224
px counts 32.8 GFLOPs = 2 × timm's published 16.5 GMACs), × 3 for forward + backward, and the bytes
autograd saves for backward per pair (fp32; parameters excluded). Recipes: region (36 × 2048
BUTD features → RegionEncoder, BERT-base text, 32 tokens), WSL grid (ResNeXt-101 32×8d at 512 px
→ 16 × 16 cells, BERT-base), CLIP ViT-B/32 (224 px, CLIP text transformer, 77 tokens). Pooling
and loss FLOPs are left out (under 1 % of these).

Assumed GPU figures (not measured here; from vendor datasheets): A100 SXM 80 GB — 312 TFLOPS dense
bf16, 80 GB; H100 SXM 80 GB — 989 TFLOPS dense bf16, 80 GB (NVIDIA A100 / H100 datasheets); a
model FLOPs utilisation of ``--mfu`` (0.35 by default: an assumption typical of CNN / ViT training,
not measured); gradient all-reduce (ring, fp32, not overlapped with compute: an upper bound) at
200 GB/s bus bandwidth inside a node of 8 (NVLink) and 25 GB/s per GPU between nodes (one 200 Gb/s
HDR InfiniBand NIC per GPU). Memory per rank: weights + gradients + AdamW moments (16 bytes per
parameter) + saved activations of the rank's share of the batch.

Epochs: COCO 113,287 training images × 5 captions = 566,435 pairs (the paper iterates captions);
CC3M 3.3 M pairs. The global batch stays the recipe's (``--batch``, 128 in the paper): with W
ranks each takes batch/W and the loss gathers all of them, so every query has batch − 1 negatives
and each rank holds a batch × batch similarity matrix.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

GPUS = {"a100": (312e12, 80e9), "h100": (989e12, 80e9)}  # dense bf16 FLOP/s, memory bytes
INTRA_BW, INTER_BW, PER_NODE = 200e9, 25e9, 8
EPOCH_PAIRS = {"COCO": 113_287 * 5, "CC3M": 3_300_000}


def count(build: Callable[[], nn.Module], inputs: Callable[[], tuple]) -> tuple[float, int, int]:
    """(forward + backward FLOPs, saved activation bytes, parameters) of ``build()(*inputs())``
    on the meta device; the output is summed for a scalar to differentiate."""
    with torch.device("meta"):
        model = build()
        args = inputs()
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in params and id(t) not in saved:
            saved[id(t)] = t.numel() * t.element_size()
        return t

    flops = FlopCounterMode(display=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with flops:
            out = model(*args)
        out.float().sum().backward()
    # backward = 2 × forward (gradients of inputs and of weights): the counter's own backward
    # figures on meta tensors came out 6.6× the forward for ResNeXt-101, not the expected ≤ 2×
    return (
        3 * float(flops.get_total_flops()),
        sum(saved.values()),
        sum(p.numel() for p in model.parameters()),
    )


class Pair(nn.Module):
    """One training pair's two towers (projections to d = 1024 included)."""

    def __init__(self, image: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.image, self.text = image, text

    def forward(self, x, ids):
        return self.image(x).float().sum() + self.text(ids).float().sum()


class Towers(nn.Module):
    def __init__(self, body: nn.Module, width: int, d: int = 1024, text: bool = False) -> None:
        super().__init__()
        self.body, self.proj, self.text = body, nn.Linear(width, d), text

    def forward(self, x):
        if self.text:
            return self.proj(self.body(input_ids=x).last_hidden_state)
        feats = self.body.forward_features(x) if hasattr(self.body, "forward_features") else x
        if feats.dim() == 4:  # CNN map [B, C, H, W] → cells [B, H·W, C]
            feats = feats.flatten(2).transpose(1, 2)
        return self.proj(feats)


class Regions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from gpo_lit.encoders.region import RegionEncoder

        self.enc = RegionEncoder(2048, 1024)

    def forward(self, x):
        return self.enc(x, torch.full((x.shape[0],), x.shape[1], device=x.device))[0]


def recipes() -> dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]]:
    import timm
    from transformers import BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

    def bert() -> nn.Module:
        return Towers(BertModel(BertConfig(), add_pooling_layer=False), 768, text=True)

    def ids(b: int, n: int) -> torch.Tensor:
        return torch.zeros(b, n, dtype=torch.long)

    return {
        "region + BERT": (
            lambda: Pair(Regions(), bert()),
            lambda b: (torch.randn(b, 36, 2048), ids(b, 32)),
        ),
        "WSL grid 512 px + BERT": (
            lambda: Pair(
                Towers(timm.create_model("resnext101_32x8d", pretrained=False), 2048), bert()
            ),  # fmt: skip
            lambda b: (torch.randn(b, 3, 512, 512), ids(b, 32)),
        ),
        "CLIP ViT-B/32": (
            lambda: Pair(
                Towers(timm.create_model("vit_base_patch32_clip_224", pretrained=False), 768),
                Towers(CLIPTextModel(CLIPTextConfig()), 512, text=True),
            ),
            lambda b: (torch.randn(b, 3, 224, 224), ids(b, 77)),
        ),
    }


def allreduce_s(param_bytes: float, world: int) -> float:
    """Ring all-reduce time of the gradients over ``world`` GPUs (no overlap with compute)."""
    if world == 1:
        return 0.0
    bw = INTRA_BW if world <= PER_NODE else INTER_BW
    return 2 * (world - 1) / world * param_bytes / bw


def estimate(flops: float, act: int, params: int, batch: int, world: int, peak: float, mfu: float):
    """(seconds per step, bytes per rank, negatives per query, similarity-matrix bytes)."""
    per_rank = batch / world
    step = flops * per_rank / (peak * mfu) + allreduce_s(4 * params, world)
    memory = 16 * params + act * per_rank + 4 * batch * batch
    return step, memory, batch - 1, 4 * batch * batch


def duration(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds < 3600 else f"{seconds / 3600:.2f} h"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="a100")
    p.add_argument("--mfu", type=float, default=0.35)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    args = p.parse_args(argv)
    peak, gpu_mem = GPUS[args.gpu]
    print(f"assumed: {args.gpu} {peak / 1e12:.0f} TFLOPS bf16 × MFU {args.mfu}, "
          f"{gpu_mem / 1e9:.0f} GB; all-reduce {INTRA_BW / 1e9:.0f} GB/s in a node of "
          f"{PER_NODE}, {INTER_BW / 1e9:.0f} GB/s between nodes; global batch {args.batch}\n")  # fmt: skip
    print("| recipe | GFLOP/pair (fwd+bwd) | act. MB/pair | params M | GPUs | per rank | "
          "s/step | COCO epoch | CC3M epoch | GB/rank | negatives/query |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    only = [s for s in args.only.split(",") if s]
    for name, (build, inputs) in recipes().items():
        if only and name not in only:
            continue
        flops, act, params = count(build, lambda inputs=inputs: inputs(2))
        flops, act = flops / 2, act / 2
        for world in (1, 8, 64):
            step, mem, neg, _ = estimate(flops, act, params, args.batch, world, peak, args.mfu)
            epochs = [math.floor(n / args.batch) * step for n in EPOCH_PAIRS.values()]
            fits = "" if mem <= gpu_mem else " (over)"
            print(f"| {name} | {flops / 1e9:.1f} | {act / 1e6:.1f} | {params / 1e6:.0f} | "
                  f"{world} | {args.batch / world:g} | {step:.3f} | {duration(epochs[0])} | "
                  f"{duration(epochs[1])} | {mem / 1e9:.1f}{fits} | {neg} |")  # fmt: skip


if __name__ == "__main__":
    main()
