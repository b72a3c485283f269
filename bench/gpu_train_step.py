"""Throughput and peak memory of one end-to-end training step on one GPU (random weights).

    python bench/gpu_train_step.py [--batch 128] [--size 512] [--steps 5] [--only wsl_fp32,...]
    python bench/gpu_train_step.py --smoke     # tiny models on the CPU: the script still works

Settings: WSL ResNeXt-101 32×8d grid + BERT-base at 512 px in fp32 (the paper), in bf16
autocast + channels-last, and bf16 + gradient checkpointing (``wsl_bf16_gc``); BUTD-shaped
regions (36 × 2048) + BERT-base. Each setting runs forward + triplet loss + backward + AdamW
step; prints images/s and peak GPU memory. An OOM is reported as such and the next setting runs.
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


def run(name: str, args, dev: torch.device) -> None:
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
    vpool, tpool = create_pooling(name="gpo", dim=d), create_pooling(name="gpo", dim=d)
    mods = torch.nn.ModuleList([vis, bert, lin, vpool, tpool]).to(dev).train()
    opt = torch.optim.AdamW(mods.parameters(), lr=1e-5)
    loss_fn = TripletLoss(margin=0.2)
    ids = torch.randint(1000, bert.config.vocab_size, (args.batch, 32), device=dev)
    tl = torch.randint(8, 33, (args.batch,), device=dev)
    mask = (torch.arange(32, device=dev)[None] < tl[:, None]).long()

    def step() -> None:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            v, vl = vis(x, xl)
            t = lin(bert(input_ids=ids, attention_mask=mask).last_hidden_state)
        # the pooling heads in fp32 (GPO's masking overflows in low precision)
        img = F.normalize(vpool(v.float(), vl), dim=-1)
        cap = F.normalize(tpool(t.float(), tl), dim=-1)
        loss = loss_fn(img, cap, torch.arange(args.batch, device=dev), hardest=True)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mods.parameters(), 2.0)
        opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    try:
        step()  # warm-up (cuDNN autotune, allocator)
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else "-"
        print(f"| {name} | {args.batch} | {dt * 1000:.0f} ms | {args.batch / dt:.0f} | {peak} |")
    except torch.cuda.OutOfMemoryError:
        total = torch.cuda.get_device_properties(dev).total_memory / 2**30
        print(f"| {name} | {args.batch} | OOM | - | > {total:.0f} GiB |")
    finally:
        if cuda:
            torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--only", default="wsl_fp32,wsl_bf16,wsl_bf16_gc,region_fp32,region_bf16")
    p.add_argument("--smoke", action="store_true", help="tiny models on the CPU (batch 4, 64 px)")
    args = p.parse_args()
    if args.smoke:
        args.batch, args.size, args.steps = 4, 64, 1
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise SystemExit("bench/gpu_train_step.py needs a CUDA GPU (or --smoke)")
    else:
        torch.backends.cudnn.benchmark = True
        dev = torch.device("cuda")
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke)"
    print(f"{where}, {args.size} px, torch {torch.__version__}")
    print("| setting | batch | step | images/s | peak memory |\n|---|---|---|---|---|")
    for name in args.only.split(","):
        run(name, args, dev)


if __name__ == "__main__":
    main()
