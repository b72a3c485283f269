"""Convert the VSE∞ authors' released checkpoints (REFERENCE §10) into gpo_lit checkpoints.

    python -m gpo_lit.convert model_best.pth out.ckpt --data-root data/f30k/precomp \
        [--vocab f30k_precomp_vocab.json | --bert bert-base-uncased] [--protocols f30k_1k]

The ``.pth`` is read with ``torch.load(weights_only=True)``; the only class it may contain
besides tensors and containers is ``argparse.Namespace`` (the training options), allow-listed
explicitly: nothing else is unpickled. Dimensions are read off the tensors, not the options.
The region + BiGRU and region + BERT checkpoints are supported; grid checkpoints need the grid
encoder (not in this release) and are refused with a one-line error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from gpo_lit.errors import GpoLitError, expect

# authors' prefix (per encoder) → gpo_lit prefix
IMAGE_KEYS = {"fc.": "visual_encoder.fc.", "mlp.": "visual_encoder.mlp.", "gpool.": "visual_pool."}
BIGRU_KEYS = {"embed.": "text_encoder.embed.", "rnn.": "text_encoder.rnn.", "gpool.": "text_pool."}
BERT_KEYS = {
    "bert.": "text_encoder.bert.",
    "linear.": "text_encoder.linear.",
    "gpool.": "text_pool.",
}
# Present in the authors' BERT state but unused by VSE∞ (all tokens are pooled) or rebuilt.
DROPPED = ("text_encoder.bert.pooler.", "text_encoder.bert.embeddings.position_ids")


def read_authors_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load the authors' ``.pth`` without unpickling anything but tensors and ``Namespace``."""
    path = Path(path)
    expect(path.is_file(), path, "the authors' checkpoint file", "no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - one line for any unreadable file
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise GpoLitError(
            f"{path}: expected a VSE∞ checkpoint holding only tensors and the options Namespace, "
            f"found {first[:200]}"
        ) from None
    expect(
        isinstance(ckpt, dict) and "model" in ckpt,
        path,
        "a dict with a 'model' entry",
        type(ckpt).__name__,
    )
    model = ckpt["model"]
    expect(
        isinstance(model, (list, tuple)) and len(model) == 2,
        f"{path} ['model']",
        "[image_encoder_state_dict, text_encoder_state_dict]",
        f"{type(model).__name__} of length {len(model) if hasattr(model, '__len__') else '?'}",
    )
    return ckpt


def _strip_module(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix DataParallel adds (the BERT releases)."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _rename(state: dict[str, Tensor], table: dict[str, str], where: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        prefix = next((p for p in table if key.startswith(p)), None)
        if prefix is None:
            raise GpoLitError(
                f"{where}: expected keys starting with {sorted(table)}, found '{key}'"
            )
        out[table[prefix] + key[len(prefix) :]] = value
    return out


def convert_state(ckpt: dict[str, Any], where: str) -> tuple[dict[str, Tensor], str]:
    """The gpo_lit state dict and the text encoder kind (``bigru`` or ``bert``)."""
    img_state, txt_state = (_strip_module(s) for s in ckpt["model"])
    if any(k.startswith(("backbone.", "image_encoder.")) for k in img_state):
        raise GpoLitError(
            f"{where}: expected a precomputed-region image encoder (fc., mlp., gpool.), found a "
            f"grid/backbone encoder, which this gpo_lit release does not convert yet"
        )
    text_kind = "bert" if any(k.startswith("bert.") for k in txt_state) else "bigru"
    state = _rename(img_state, IMAGE_KEYS, f"{where} image encoder")
    table = BERT_KEYS if text_kind == "bert" else BIGRU_KEYS
    state |= _rename(txt_state, table, f"{where} text encoder")
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED)}
    return state, text_kind


def model_config(state: dict[str, Tensor], text_kind: str, bert: str | None) -> dict[str, Any]:
    """``VSEModel`` kwargs matching the tensors' shapes (the paper's recipe otherwise)."""
    embed_dim, in_dim = state["visual_encoder.fc.weight"].shape
    has_mlp = "visual_encoder.mlp.layers.0.weight" in state
    visual = {
        "_target_": "gpo_lit.encoders.RegionEncoder",
        "in_dim": int(in_dim),
        "embed_dim": int(embed_dim),
        "mlp_hidden": int(state["visual_encoder.mlp.layers.0.weight"].shape[0]) if has_mlp else 512,
        "residual_mlp": has_mlp,
    }
    if text_kind == "bert":
        expect(
            bert is not None, "--bert", "the BERT model name or folder the checkpoint used", None
        )
        text = {
            "encoder": {
                "_target_": "gpo_lit.encoders.HFTextEncoder",
                "name_or_path": bert,
                "embed_dim": int(embed_dim),
                "pretrained": False,
            },
            "tokenizer": {"kind": "hf", "name_or_path": bert, "max_length": 128},
        }
    else:
        vocab_size, word_dim = state["text_encoder.embed.weight"].shape
        text = {
            "encoder": {
                "_target_": "gpo_lit.encoders.BiGRUTextEncoder",
                "word_dim": int(word_dim),
                "embed_dim": int(embed_dim),
                "num_layers": 1,
            },
            "tokenizer": {"kind": "vocab"},
        }
    gpo = {"name": "gpo", "d_pe": 32, "d_hidden": 32, "temperature": 0.1}
    return {
        "visual": visual,
        "text": text,
        "pooling": gpo,
        "embed_dim": int(embed_dim),
        "loss": {
            "margin": 0.2,
            "all_negatives_epochs": 1,
            "mask_same_image": False,
            "gather": True,
        },
        "optim": {
            "lr": 5e-4,
            "weight_decay": 1e-4,
            "lr_mults": None,
            "decay_epochs": [15],
            "decay_gamma": 0.1,
        },
        "evaluation": {
            "val_protocol": "full",
            "test_protocols": ["full"],
            "shard_size": 1024,
            "save_embeddings_to": None,
        },
    }


def convert(
    src: str | Path,
    dst: str | Path,
    data_root: str,
    vocab: str | None = None,
    bert: str | None = None,
    test_split: str = "test",
    protocols: list[str] | None = None,
) -> Path:
    """Write a gpo_lit checkpoint (weights + run config) converted from the authors' ``src``."""
    from gpo_lit.data.vocab import Vocabulary
    from gpo_lit.model import VSEModel

    dst = Path(dst)
    if dst.exists():
        raise GpoLitError(f"{dst}: expected a new file, found an existing one (not overwritten)")
    ckpt = read_authors_checkpoint(src)
    state, text_kind = convert_state(ckpt, str(src))
    hparams = model_config(state, text_kind, bert)
    hparams["evaluation"]["test_protocols"] = list(protocols or ["full"])
    words = None
    if text_kind == "bigru":
        expect(
            vocab is not None,
            "--vocab",
            "the vocabulary JSON the checkpoint was trained with",
            None,
        )
        words = Vocabulary.load(vocab).idx2word
        n = state["text_encoder.embed.weight"].shape[0]
        expect(len(words) == n, vocab, f"{n} words (the checkpoint's embedding rows)", len(words))
    model = VSEModel(**hparams, vocab=words)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GpoLitError(
            f"{src}: expected the weights of a {text_kind} VSE∞ model, found missing "
            f"{sorted(missing)[:4]} and unexpected {sorted(unexpected)[:4]}"
        )
    run_config = {
        "data": {
            "_target_": "gpo_lit.data.datamodule.RetrievalDataModule",
            "root": data_root,
            "test_split": test_split,
            "val_max_images": None,
            "eval_batch_size": 128,
            "num_workers": 0,
        },
        "converted_from": str(src),
    }
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "hyper_parameters": {**hparams, "vocab": words},
            "state_dict": model.state_dict(),
            "gpo_lit_config": run_config,
        },
        dst,
    )
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpo_lit.convert", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help="the authors' .pth checkpoint")
    parser.add_argument("dst", help="the gpo_lit checkpoint to write")
    parser.add_argument("--data-root", required=True, help="precomp folder to evaluate on")
    parser.add_argument("--vocab", help="vocabulary JSON (BiGRU checkpoints)")
    parser.add_argument("--bert", help="local BERT folder or cached name (BERT checkpoints)")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--protocols", nargs="+", default=["full"])
    args = parser.parse_args(argv)
    try:
        out = convert(
            args.src,
            args.dst,
            args.data_root,
            args.vocab,
            args.bert,
            args.test_split,
            args.protocols,
        )
    except GpoLitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}; evaluate with: make eval CKPT={out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
