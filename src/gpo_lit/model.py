"""The LightningModule: encoders + pooling + l2norm per modality, the loss (a ``_target_`` node
behind :mod:`gpo_lit.losses.base`'s interface), optimiser groups (:mod:`gpo_lit.optim`), and
evaluation that embeds each image and each caption once."""

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
from gpo_lit.encoders.uncertainty import UncertaintyHead
from gpo_lit.errors import GpoLitError, expect
from gpo_lit.losses import PairEmbeddings, RetrievalLoss, StepInfo, instantiate_loss
from gpo_lit.metrics import evaluate
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
        loss: ``_target_`` node of a :class:`gpo_lit.losses.RetrievalLoss` (``conf/loss/``).
        optim: the ``conf/optim/`` node (see :mod:`gpo_lit.optim`).
        evaluation: ``val_protocol``, ``test_protocols`` (list), ``shard_size``.
        uncertainty_pooling: pooling of the log σ² heads, built only when the loss uses them
            (``loss.uses_uncertainty``; None = GPO's defaults).
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
        uncertainty_pooling: dict | None = None,
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
        self.loss_fn: RetrievalLoss = instantiate_loss(loss)
        # log σ² heads (PCME++): only for losses that use them, so other models are unchanged
        self.visual_uncertainty: UncertaintyHead | None = None
        self.text_uncertainty: UncertaintyHead | None = None
        if self.loss_fn.uses_uncertainty:
            head_pool = uncertainty_pooling or {"name": "gpo"}
            self.visual_uncertainty = UncertaintyHead(embed_dim, head_pool)
            self.text_uncertainty = UncertaintyHead(embed_dim, head_pool)
        self.optim_cfg = optim
        self.eval_cfg = evaluation
        self.test_results: dict[str, dict[str, float]] = {}
        self.run_config: dict | None = None  # the composed Hydra config, stored in checkpoints
        self.loss_scale = 1.0  # set by schedules (e.g. the grid models' backbone warm-up)
        self._eval_buffers: list[list[tuple[Tensor, Tensor]]] = [[], []]

    # -- embedding -------------------------------------------------------------------------
    def encode_images(self, img: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, N, D_in]`` padded sets (or raw images) + lengths → (l2-normalised mean
        ``[B, d]``, log σ² ``[B, d]`` or None without an uncertainty head)."""
        feats, lengths = self.visual_encoder(img, lengths)
        mean = F.normalize(self.visual_pool(feats, lengths), dim=-1)
        head = self.visual_uncertainty
        return mean, (head(feats, lengths) if head is not None else None)

    def encode_captions(self, ids: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor | None]:
        """``[B, L]`` token ids + lengths → (l2-normalised mean ``[B, d]``, log σ² or None)."""
        feats, lengths = self.text_encoder(ids, lengths)
        mean = F.normalize(self.text_pool(feats, lengths), dim=-1)
        head = self.text_uncertainty
        return mean, (head(feats, lengths) if head is not None else None)

    def embed_images(self, img: Tensor, lengths: Tensor) -> Tensor:
        """``[B, N, D_in]`` padded sets + lengths → l2-normalised ``[B, d]``."""
        return self.encode_images(img, lengths)[0]

    def embed_captions(self, ids: Tensor, lengths: Tensor) -> Tensor:
        """``[B, L]`` token ids + lengths → l2-normalised ``[B, d]``."""
        return self.encode_captions(ids, lengths)[0]

    def retrieval_embeddings(self, batch: dict[str, Tensor], which: int) -> Tensor:
        """Evaluation vectors of a batch of images (``which`` 0) or captions (1): their inner
        products are the loss's test similarity (the l2-normalised means for dot-product losses)."""
        if which == 0:
            mean, logvar = self.encode_images(batch["img"], batch["img_len"])
            return self.loss_fn.retrieval_vectors(mean, logvar, "img")
        mean, logvar = self.encode_captions(batch["cap"], batch["cap_len"])
        return self.loss_fn.retrieval_vectors(mean, logvar, "cap")

    # -- training --------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, ids = batch["img"], batch["img_idx"]
        mix_lam = mix_ids = None
        if self.loss_fn.mixing is not None:  # batch augmentation of raw images (PCME++)
            images, mix_lam, partner = self.loss_fn.mixing(images)
            mix_ids = ids[partner.to(ids.device)]
        img, img_logvar = self.encode_images(images, batch["img_len"])
        cap, cap_logvar = self.encode_captions(batch["cap"], batch["cap_len"])
        pairs = PairEmbeddings(img, cap, ids, img_logvar, cap_logvar, mix_lam, mix_ids)
        out = self.loss_fn.training_loss(pairs, self._step_info(batch_idx))
        loss = out.value * self.loss_scale
        self.log("train/loss", loss, prog_bar=True, batch_size=img.shape[0])
        for key, value in out.logs.items():
            self.log(f"train/{key}", value, batch_size=img.shape[0])
        return loss

    def _step_info(self, batch_idx: int) -> StepInfo:
        trainer = self._trainer
        if trainer is None:  # called outside a Trainer (tests, benchmarks)
            return StepInfo(epoch=0, batch_idx=batch_idx)
        return StepInfo(
            epoch=self.current_epoch,
            batch_idx=batch_idx,
            batches_per_epoch=trainer.num_training_batches,
            global_step=self.global_step,
        )

    def configure_optimizers(self) -> dict[str, Any]:
        from gpo_lit.optim import configure_optimization

        return configure_optimization(list(self.named_parameters()), self.optim_cfg)

    # -- evaluation ------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        emb = self.retrieval_embeddings(batch, dataloader_idx)
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
        results = {p: evaluate(img, cap, cap2img, protocol=p, shard_size=shard) for p in protocols}
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
