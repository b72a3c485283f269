"""Evaluate saved embeddings: ``python -m gpo_lit.metrics EMB.npz [EMB2.npz ...] --protocol P``.

Several files form an ensemble (similarity matrices averaged); they must share cap2img.
``--ties optimistic`` counts only candidates strictly above the ground truth (default
``pessimistic``: ties count against the query).
A GpoLitError is printed as one line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.embeddings_io import load_embeddings
from gpo_lit.metrics.protocols import PROTOCOLS, evaluate, get_protocol
from gpo_lit.metrics.ranks import TIES, check_ties


def format_table(metrics: dict[str, float]) -> str:
    """Two rows (image→text, text→image) of R@1/5/10, MedR, MeanR, then rsum."""
    cols = ("r1", "r5", "r10", "medr", "meanr")
    head = f"{'':12s}" + "".join(
        f"{c.upper():>9s}" for c in ("R@1", "R@5", "R@10", "MedR", "MeanR")
    )
    lines = [head]
    for label, pre in (("image→text", "i2t"), ("text→image", "t2i")):
        lines.append(f"{label:12s}" + "".join(f"{metrics[f'{pre}_{c}']:9.2f}" for c in cols))
    lines.append(f"{'rsum':12s}{metrics['rsum']:9.2f}")
    return "\n".join(lines)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GpoLitError(f"--device: expected cpu or cuda[:N], found {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GpoLitError(f"--device: expected an available device, found {name!r} (no CUDA)")
    return device


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m gpo_lit.metrics", description=__doc__.splitlines()[0]
    )
    ap.add_argument("files", nargs="+", type=Path, help="embeddings .npz (img, cap, cap2img)")
    ap.add_argument("--protocol", default="full", help=f"one of {', '.join(PROTOCOLS)}")
    ap.add_argument("--shard-size", type=int, default=1024)
    ap.add_argument(
        "--ties",
        default="pessimistic",
        help=f"{' or '.join(TIES)}: a candidate equal to the ground truth counts against the "
        "query, or only those strictly above count (default pessimistic)",
    )
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    args = ap.parse_args(argv)
    try:
        get_protocol(args.protocol)  # fail before loading anything
        check_ties(args.ties)
        device = _device(args.device)
        loaded = [load_embeddings(f) for f in args.files]
        cap2img = loaded[0][2]
        for f, (_, _, c2i) in zip(args.files[1:], loaded[1:], strict=True):
            if not torch.equal(c2i, cap2img):
                raise GpoLitError(
                    f"{f}: expected the same cap2img as {args.files[0]} (ensemble), found a different one"
                )
        imgs = [img.to(device) for img, _, _ in loaded]
        caps = [cap.to(device) for _, cap, _ in loaded]
        metrics = evaluate(imgs, caps, cap2img, args.protocol, args.shard_size, args.ties)
    except GpoLitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = " + ".join(str(f) for f in args.files)
    print(
        f"protocol {args.protocol}, ties {args.ties}: {names} "
        f"({imgs[0].shape[0]} images, {caps[0].shape[0]} captions)"
    )
    print(format_table(metrics))
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(metrics, indent=2) + "\n")
        except OSError as e:
            print(
                f"error: {args.json}: expected a writable path, found {e.strerror}", file=sys.stderr
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
