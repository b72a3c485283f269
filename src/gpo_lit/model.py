"""The LightningModule: encoders + pooling + l2norm per modality, the triplet loss, optimiser
groups, and evaluation that embeds each image and each caption once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from gpo_lit.data.tokenize import CaptionTokenizer, HFTokenizer, VocabTokenizer
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.errors import GpoLitError, expect
from gpo_lit.losses import TripletLoss
from gpo_lit.metrics import check_ties, evaluate
from gpo_lit.pooling import create_pooling


def build_tokenizer(cfg: dict, vocab: list[str] | None) -> CaptionTokenizer:
    """The tokenizer a text encoder config names: ``kind: vocab`` (BiGRU) or ``kind: hf``."""
    kind = cfg.get("kind")
    if kind == "vocab":
        expect(vocab is not None, "model.vocab", "a word list for the BiGRU tokenizer", None)
        return VocabTokenizer(Vocabulary(vocab))
    if kind == "hf":
        return HFTokenizer(cfg["name_or_path"], max_length=cfg.get("max_length", 128))
    raise GpoLitError(f"model.text.tokenizer.kind: expected 'vocab' or 'hf', found {kind!r}")


class VSEModel(pl.LightningModule):
    """Visual-semantic embedding model (VSE∞ and its pooling baselines).

    Every argument is a plain config dict so the checkpoint alone rebuilds the model.

    Args:
        visual: ``_target_`` node of the visual encoder (returns a set + lengths).
        text: ``{"encoder": _target_ node, "tokenizer": {...}}``.
        pooling: pooling used for both modalities unless overridden (``{"name": ..., **kwargs}``).
        visual_pooling, text_pooling: per-modality override of ``pooling`` (None = use it).
        embed_dim: joint embedding width d.
        loss: kwargs of :class:`TripletLoss`.
        optim: ``lr``, ``weight_decay``, ``lr_mults`` ({parameter-name prefix: multiplier}),
            ``decay_epochs`` and ``decay_gamma`` (lr × gamma at each listed epoch).
        evaluation: ``val_protocol``, ``test_protocols`` (list), ``shard_size``, ``ties``
            (``pessimistic``, the default, or ``optimistic``; see ``gpo_lit.metrics.ranks``).
        vocab: the BiGRU vocabulary as an id-ordered word list (None for HF tokenizers).
    """

    def __init__(
        self,
        visual: dict,
        text: dict,
        pooling: dict,
        embed_dim: int,
        loss: dict,
        optim: dict,
        evaluation: dict,
        visual_pooling: dict | None = None,
        text_pooling: dict | None = None,
        vocab: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run config is logged whole instead
        self.tokenizer = build_tokenizer(text["tokenizer"], vocab)
        self.visual_encoder = instantiate(visual)
        encoder_cfg = dict(text["encoder"])
        if text["tokenizer"].get("kind") == "vocab":
            encoder_cfg["vocab_size"] = self.tokenizer.vocab_size
        self.text_encoder = instantiate(encoder_cfg)
        self.visual_pool = create_pooling(dim=embed_dim, **(visual_pooling or pooling))
        self.text_pool = create_pooling(dim=embed_dim, **(text_pooling or pooling))
        self.loss_fn = TripletLoss(**loss)
        self.optim_cfg = optim
        check_ties(evaluation.get("ties", "pessimistic"))  # not after the first epoch
        self.eval_cfg = evaluation
        self.test_results: dict[str, dict[str, float]] = {}
        self.run_config: dict | None = None  # the composed Hydra config, stored in checkpoints
        self.loss_scale = 1.0  # set by schedules (e.g. the grid models' backbone warm-up)
        self._eval_buffers: list[list[tuple[Tensor, Tensor]]] = [[], []]

    # -- embedding -------------------------------------------------------------------------
    def embed_images(self, img: Tensor, lengths: Tensor) -> Tensor:
        """``[B, N, D_in]`` padded sets + lengths → l2-normalised ``[B, d]``."""
        feats, lengths = self.visual_encoder(img, lengths)
        return F.normalize(self.visual_pool(feats, lengths), dim=-1)

    def embed_captions(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` token ids + lengths → l2-normalised ``[B, d]``."""
        feats, lengths = self.text_encoder(ids, lengths)
        return F.normalize(self.text_pool(feats, lengths), dim=-1)

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        img = self.embed_images(batch["img"], batch["img_len"])
        cap = self.embed_captions(batch["cap"], batch["cap_len"])
        hardest = self.loss_fn.hardest_for_epoch(self.current_epoch)
        loss = self.loss_fn(img, cap, batch["img_idx"], hardest=hardest) * self.loss_scale
        self.log("train/loss", loss, prog_bar=True, batch_size=img.shape[0])
        self.log("train/hardest_negatives", float(hardest), batch_size=img.shape[0])
        self.log("train/negative_pool", float(self.loss_fn.negative_pool(img.shape[0])))
        return loss

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.optim_cfg
        lr = cfg["lr"]
        mults: dict[str, float] = dict(cfg.get("lr_mults") or {})
        # Every parameter, frozen ones included: schedules unfreeze backbones later, and AdamW
        # skips parameters without gradients.
        named = list(self.named_parameters())
        for prefix in mults:
            if not any(n.startswith(prefix) for n, _ in named):
                raise GpoLitError(
                    f"optim.lr_mults: expected a parameter-name prefix of this model, found "
                    f"{prefix!r} (top-level modules: visual_encoder, text_encoder, visual_pool, "
                    f"text_pool)"
                )
        groups: dict[float, list[Tensor]] = {}
        for name, param in named:
            mult = next((m for p, m in mults.items() if name.startswith(p)), 1.0)
            groups.setdefault(mult, []).append(param)
        optimizer = torch.optim.AdamW(
            [{"params": ps, "lr": lr * m} for m, ps in groups.items()],
            lr=lr,
            weight_decay=cfg["weight_decay"],
        )
        scheduler = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=list(cfg.get("decay_epochs") or []), gamma=cfg["decay_gamma"]
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }

    # -- evaluation ------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        if dataloader_idx == 0:
            emb = self.embed_images(batch["img"], batch["img_len"])
        else:
            emb = self.embed_captions(batch["cap"], batch["cap_len"])
        self._eval_buffers[dataloader_idx].append((batch["idx"], emb.float()))

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def _collect(self, which: int, n: int) -> Tensor:
        """Embeddings of items 0..n−1 from every rank, de-duplicated by dataset index.

        ``DistributedSampler`` pads by repeating items, so the same index may arrive twice.
        """
        buf = self._eval_buffers[which]
        idx = torch.cat([i for i, _ in buf]).to(self.device)
        emb = torch.cat([e for _, e in buf])
        if self.trainer.world_size > 1:
            idx = self.all_gather(idx).reshape(-1)
            emb = self.all_gather(emb).reshape(-1, emb.shape[-1])
        out = emb.new_full((n, emb.shape[-1]), float("nan"))
        out[idx] = emb
        seen = torch.zeros(n, dtype=torch.bool, device=emb.device)
        seen[idx] = True
        if not bool(seen.all()):
            raise RuntimeError(f"evaluation embedded {int(seen.sum())} of {n} items")
        return out

    def _finish_eval(self, stage: str) -> dict[str, dict[str, float]]:
        split = self.trainer.datamodule.eval_split(stage)
        img = self._collect(0, split.n_images)
        cap = self._collect(1, split.n_captions)
        self._eval_buffers = [[], []]
        cap2img = torch.as_tensor(split.cap2img, device=img.device)
        protocols = (
            [self.eval_cfg["val_protocol"]] if stage == "val" else self.eval_cfg["test_protocols"]
        )
        shard = self.eval_cfg.get("shard_size", 1024)
        ties = self.eval_cfg.get("ties", "pessimistic")  # checkpoints written before it: default
        results = {p: evaluate(img, cap, cap2img, p, shard, ties) for p in protocols}
        # The last evaluation's embeddings, for callbacks (gpo_lit.callbacks.RetrievalExamples).
        self.last_eval = (img, cap, cap2img, stage)
        if self.eval_cfg.get("save_embeddings_to") and stage == "test":
            from gpo_lit.metrics import save_embeddings

            save_embeddings(self.eval_cfg["save_embeddings_to"], img, cap, cap2img)
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._eval_buffers = [[], []]
            return
        (metrics,) = self._finish_eval("val").values()
        # Every rank computed the same numbers from the gathered embeddings.
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if k != "rsum"}, sync_dist=True)
        self.log("val/rsum", metrics["rsum"], prog_bar=True, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish_eval("test")
        for protocol, metrics in self.test_results.items():
            self.log_dict({f"test/{protocol}/{k}": v for k, v in metrics.items()}, sync_dist=True)
        # Written here, not by the caller: under ddp_spawn the caller's copy of the model never
        # sees the results. Logged values are float32; the file keeps full precision.
        path = self.eval_cfg.get("results_to")
        if path and self.trainer.is_global_zero:
            from gpo_lit.cli import write_metrics

            write_metrics(Path(path), self.test_results)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.run_config is not None:
            checkpoint["gpo_lit_config"] = self.run_config


def load_model(path: str | Path, map_location: str = "cpu") -> tuple[VSEModel, dict | None]:
    """Rebuild a model from a gpo_lit checkpoint (``weights_only=True``: no arbitrary unpickling).

    Returns the model in eval mode and the run config stored with it (or None).
    """
    path = Path(path)
    if not path.is_file():
        raise GpoLitError(f"{path}: expected a checkpoint file, found no such file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise GpoLitError(
            f"{path}: expected a gpo_lit checkpoint readable with weights_only=True, found "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None
    for key in ("hyper_parameters", "state_dict"):
        expect(key in ckpt, path, f"a '{key}' entry (a gpo_lit checkpoint)", sorted(ckpt)[:6])
    model = VSEModel(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt.get("gpo_lit_config")
