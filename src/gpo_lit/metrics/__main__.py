"""Evaluate saved embeddings: ``python -m gpo_lit.metrics EMB.npz [EMB2.npz ...] --protocol P[,Q]``.

Several files form an ensemble (similarity matrices averaged); they must share cap2img. Several
protocols (comma-separated) share one load; ``eccv`` / ``cxc`` need ``--coco-ids`` (the folder of
the CxC annotation files ``testall_ids.txt`` and ``testall_capids.txt``, or one holding
``cxc_annots/``). Every protocol's size is checked before anything is ranked. ``--json`` writes
``{protocol: {metric: value}}``, the layout of ``metrics.json`` (never over an existing file). A GpoLitError is printed as one
line on stderr, exit status 2.
``--ties optimistic`` counts only candidates strictly above the ground truth (default
``pessimistic``: ties count against the query).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gpo_lit.errors import GpoLitError
from gpo_lit.metrics.ensemble import load_members
from gpo_lit.metrics.prepared import TIES, check_ties
from gpo_lit.metrics.protocols import PROTOCOLS, check_size, evaluate_protocols, get_protocol
from gpo_lit.metrics.table import results_block


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
    ap.add_argument(
        "--protocol",
        default="full",
        help=f"one or more (comma-separated) of {', '.join(PROTOCOLS)}",
    )
    ap.add_argument("--coco-ids", type=Path, default=None, help="CxC ids folder (eccv, cxc)")
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
        protocols = [get_protocol(p.strip()) for p in args.protocol.split(",")]  # fail first
        if args.json is not None:
            from gpo_lit.files import ensure_new

            ensure_new(args.json)
        check_ties(args.ties)
        device = _device(args.device)
        imgs, caps, cap2img = load_members(args.files)
        n_img = imgs[0].shape[0]
        for p in protocols:
            check_size(p, n_img, where=str(args.files[0]))
        coco_ids = None
        if any(p.package for p in protocols):
            from gpo_lit.metrics.eccv import find_ids_dir, read_coco_ids

            if args.coco_ids is None:
                raise GpoLitError(
                    "--coco-ids: expected the folder of cxc_annots/testall_ids.txt and "
                    "testall_capids.txt (for eccv / cxc), found none given"
                )
            coco_ids = read_coco_ids(find_ids_dir(args.coco_ids, None), cap2img.numpy())
        imgs = [img.to(device) for img in imgs]
        caps = [cap.to(device) for cap in caps]
        results = evaluate_protocols(
            imgs, caps, cap2img, protocols, args.shard_size, args.ties, coco_ids
        )
    except GpoLitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = " + ".join(str(f) for f in args.files)
    sizes = f"{imgs[0].shape[0]} images, {caps[0].shape[0]} captions, ties {args.ties}"
    print(results_block(f"Test metrics of {names} ({sizes})", results))
    if args.json is not None:
        from gpo_lit.cli import write_metrics

        try:
            write_metrics(args.json, results)
        except OSError as e:
            print(
                f"error: {args.json}: expected a writable path, found {e.strerror}", file=sys.stderr
            )
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
