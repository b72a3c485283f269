"""Throughput and peak memory of one end-to-end training step on one GPU (random weights).

    python bench/gpu_train_step.py [--batch 128] [--size 512] [--steps 5] [--only wsl_fp32,...]
        [--pooling gpo,max]
    python bench/gpu_train_step.py --device cpu --tiny   # tiny models on the CPU (tested)

Settings: WSL ResNeXt-101 32×8d grid + BERT-base at 512 px in fp32 (the paper), in bf16
autocast + channels-last, and bf16 + gradient checkpointing (``wsl_bf16_gc``); BUTD-shaped
regions (36 × 2048) + BERT-base; each with GPO and with max pooling (``--pooling``). Each runs
forward + triplet loss + backward + AdamW step; prints the step time, images/s, peak GPU memory
and the pooling's share of the step (the two pooling heads and the loss, forward and backward,
timed alone on the same features). An OOM is reported as such and the next setting runs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from gpo_lit.encoders.grid import GridEncoder
from gpo_lit.encoders.region import RegionEncoder
from gpo_lit.losses import TripletLoss
from gpo_lit.pooling import create_pooling


def bert_base(d: int, smoke: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    from transformers import BertConfig, BertModel

    size = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2} if smoke else {}
    cfg = BertConfig(**size, intermediate_size=64) if smoke else BertConfig()
    return BertModel(cfg, add_pooling_layer=False), torch.nn.Linear(cfg.hidden_size, d)


def run(name: str, pooling: str, args, dev: torch.device) -> None:
    d = 64 if args.smoke else 1024
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    bf16 = "bf16" in name
    if name.startswith("wsl"):
        vis = GridEncoder(
            "test_resnet.r160_in1k" if args.smoke else "resnext101_32x8d",
            d,
            pretrained=False,
            channels_last=bf16,
            grad_checkpointing=name.endswith("_gc"),
        )
        x = torch.randn(args.batch, 3, args.size, args.size, device=dev)
        xl = torch.full((args.batch,), 3, device=dev)
    else:
        vis = RegionEncoder(2048, d)
        x = torch.randn(args.batch, 36, 2048, device=dev)
        xl = torch.full((args.batch,), 36, device=dev)
    bert, lin = bert_base(d, args.smoke)
    vpool, tpool = create_pooling(name=pooling, dim=d), create_pooling(name=pooling, dim=d)
    mods = torch.nn.ModuleList([vis, bert, lin, vpool, tpool]).to(dev).train()
    opt = torch.optim.AdamW(mods.parameters(), lr=1e-5)
    loss_fn = TripletLoss(margin=0.2)
    ids = torch.randint(1000, bert.config.vocab_size, (args.batch, 32), device=dev)
    tl = torch.randint(8, 33, (args.batch,), device=dev)
    mask = (torch.arange(32, device=dev)[None] < tl[:, None]).long()

    def heads(v: torch.Tensor, vl: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the pooling heads in fp32 (GPO's masking overflows in low precision)
        img = F.normalize(vpool(v.float(), vl), dim=-1)
        cap = F.normalize(tpool(t.float(), tl), dim=-1)
        return loss_fn(img, cap, torch.arange(args.batch, device=dev), hardest=True)

    def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            v, vl = vis(x, xl)
            t = lin(bert(input_ids=ids, attention_mask=mask).last_hidden_state)
        loss = heads(v, vl, t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mods.parameters(), 2.0)
        opt.step()
        return v.detach(), vl, t.detach()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    row = f"| {name} | {pooling} | {args.batch} |"
    try:
        step()  # warm-up (cuDNN autotune, allocator)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            feats = step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
        v, vl, t = (f.requires_grad_() if f.is_floating_point() else f for f in feats)
        heads(v, vl, t).backward()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            heads(v, vl, t).backward()
        sync()
        share = (time.perf_counter() - t0) / args.steps / dt
        print(f"{row} {dt * 1000:.0f} ms | {args.batch / dt:.1f} | {peak} | {share:.1%} |")
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        print(f"{row} OOM | - | > {total:.0f} GiB | - |")
    finally:
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default="wsl_fp32,wsl_bf16,wsl_bf16_gc,region_fp32,region_bf16")
    p.add_argument("--pooling", default="gpo,max", help="pooling operators to compare")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny models (batch 4, 64 px): seconds")
    p.add_argument("--smoke", action="store_true", help="the same as --device cpu --tiny")
    args = p.parse_args()
    if args.smoke:
        args.device, args.tiny = "cpu", True
    args.smoke = args.tiny  # tiny model sizes
    if args.tiny:
        args.batch, args.size, args.steps = 4, 64, 1
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: expected a CUDA GPU, found none (--device cpu --tiny runs")
        print("the script on a CPU)")
        raise SystemExit(2)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    dev = torch.device(args.device)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    print(f"{where}, {args.size} px, torch {torch.__version__}")
    print("| setting | pooling | batch | step | images/s | peak memory | pooling share |")
    print("|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        for pooling in args.pooling.split(","):
            run(name, pooling, args, dev)


if __name__ == "__main__":
    main()
