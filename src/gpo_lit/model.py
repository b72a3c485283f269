"""The LightningModule: encoders + pooling + l2norm per modality, the loss (a ``_target_`` node
behind :mod:`gpo_lit.losses.base`'s interface), optimiser groups (:mod:`gpo_lit.optim`), and
evaluation that embeds each image and each caption once."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor

from gpo_lit import random_state
from gpo_lit.data.tokenize import CaptionTokenizer, HFTokenizer, VocabTokenizer
from gpo_lit.data.vocab import Vocabulary
from gpo_lit.divergence import LossWatch
from gpo_lit.encoders.uncertainty import UncertaintyHead
from gpo_lit.errors import GpoLitError, expect, first_line, user_error
from gpo_lit.losses import PairEmbeddings, RetrievalLoss, StepInfo, instantiate_loss
from gpo_lit.metrics import check_ties
from gpo_lit.metrics.collect import RankedEmbeddings, RankingTask, RetrievalEmbeddings
from gpo_lit.modalities import pooling_for
from gpo_lit.pooling import create_pooling

if TYPE_CHECKING:
    from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig

    from gpo_lit.metrics.eccv import CocoIds

log = logging.getLogger(__name__)


def build_tokenizer(cfg: dict, vocab: list[str] | None) -> CaptionTokenizer:
    """The tokenizer a text encoder config names: ``kind: vocab`` (BiGRU) or ``kind: hf``."""
    kind = cfg.get("kind")
    if kind == "vocab":
        expect(vocab is not None, "model.vocab", "a word list for the BiGRU tokenizer", None)
        assert vocab is not None  # for mypy: expect raised otherwise
        return VocabTokenizer(Vocabulary(vocab))
    if kind == "hf":
        return HFTokenizer(
            cfg["name_or_path"],
            max_length=cfg.get("max_length", 128),
            mask_token=cfg.get("mask_token"),
        )
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
        evaluation: ``val_protocol``, ``test_protocols`` (list), ``shard_size``, ``ties``
            (``pessimistic``, the default, or ``optimistic``; see ``gpo_lit.metrics.ranks``).
        uncertainty_pooling: pooling of the log σ² heads, built only when the loss uses them
            (``loss.uses_uncertainty``; None = GPO's defaults).
            ``coco_ids`` (folder of the CxC id files for eccv / cxc; None: found beside the data root).
        uncertainty_bias_init: log σ² of those heads at initialisation (their Linear's bias).
        vocab: the BiGRU vocabulary as an id-ordered word list (None for HF tokenizers).
        compile: ``torch.compile`` the encoders and pooling heads (:mod:`gpo_lit.compile`);
            :func:`load_model` always builds the eager model.
        compile_backend: the ``torch.compile`` backend (``inductor``; ``eager`` to test).
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
        uncertainty_bias_init: float = 0.0,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run config is logged whole instead
        self.tokenizer = build_tokenizer(text["tokenizer"], vocab)
        self.visual_encoder = instantiate(visual)
        encoder_cfg = dict(text["encoder"])
        if text["tokenizer"].get("kind") == "vocab":
            encoder_cfg["vocab_size"] = self.tokenizer.vocab_size
        self.text_encoder = instantiate(encoder_cfg)
        self.visual_pool = create_pooling(dim=embed_dim, **pooling_for(self.hparams, "visual"))
        self.text_pool = create_pooling(dim=embed_dim, **pooling_for(self.hparams, "text"))
        self.loss_fn: RetrievalLoss = instantiate_loss(loss)
        # log σ² heads (PCME++): only for losses that use them, so other models are unchanged
        self.visual_uncertainty: UncertaintyHead | None = None
        self.text_uncertainty: UncertaintyHead | None = None
        if self.loss_fn.uses_uncertainty:
            head_pool = uncertainty_pooling or {"name": "gpo"}
            bias = uncertainty_bias_init
            self.visual_uncertainty = UncertaintyHead(embed_dim, head_pool, bias)
            self.text_uncertainty = UncertaintyHead(embed_dim, head_pool, bias)
        if compile:
            from gpo_lit.compile import compile_modules

            heads = (self.visual_uncertainty, self.text_uncertainty)
            parts = (self.visual_encoder, self.text_encoder, self.visual_pool, self.text_pool)
            compile_modules((*parts, *heads), compile_backend)
        self.optim_cfg = optim
        check_ties(evaluation.get("ties", "pessimistic"))  # not after the first epoch
        self.eval_cfg = evaluation
        self.test_results: dict[str, dict[str, float]] = {}
        self.run_config: dict | None = None  # the composed Hydra config, stored in checkpoints
        # COCO ids of the test split (eccv / cxc), set by the entry points
        self.coco_ids: CocoIds | None = None
        self.loss_scale = 1.0  # set by schedules (e.g. the grid models' backbone warm-up)
        # (index, embedding) of the split being evaluated, from every rank (gpo_lit.metrics)
        self.eval_embeddings = RetrievalEmbeddings()
        # What each stage's last evaluation ranked, for the callbacks (gpo_lit.callbacks).
        self.evaluated: dict[str, RankedEmbeddings] = {}
        self.loss_watch = LossWatch(optim["lr"])
        self._step_loss: Tensor | None = None  # the last training step's loss (progress bar)
        self.val_rsum_best = float("-inf")  # the best validation rsum so far
        self._subset_said: set[str] = set()  # stages whose subset evaluation was announced
        self._random_state: dict[str, Any] | None = None  # to put back at the first resumed batch

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
        self.loss_watch.update(loss, self.global_step, self.current_epoch)
        self._step_loss = loss.detach()
        # No prog_bar here: Lightning reads a progress-bar value back every step (a host sync);
        # Python numbers are logged as CPU tensors (Lightning would copy them to the device).
        self.log("train/loss", loss, batch_size=img.shape[0])
        for key, value in out.logs.items():
            value = value if isinstance(value, Tensor) else torch.tensor(float(value))
            self.log(f"train/{key}", value, batch_size=img.shape[0])
        return loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._random_state is not None:  # resumed mid-epoch (gpo_lit.random_state)
            random_state.restore(self._random_state, self.global_rank, self.trainer.world_size)
            self._random_state = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # read back where the loggers sync anyway (see gpo_lit.divergence)
        # Lightning sets trainer.log_every_n_steps at run time; its hints lack it
        every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]
        if self.global_step % max(1, every) == 0:
            self.loss_watch.check()
            if self._step_loss is not None:  # the progress bar's loss: a CPU copy, read here only
                self.log("loss", self._step_loss.cpu(), prog_bar=True, logger=False)

    def on_train_epoch_end(self) -> None:
        self.loss_watch.check()

    def on_validation_start(self) -> None:
        self.loss_watch.check()

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

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        from gpo_lit.optim import configure_optimization

        return configure_optimization(list(self.named_parameters()), self.optim_cfg)

    # -- evaluation ------------------------------------------------------------------------
    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        emb = self.retrieval_embeddings(batch, dataloader_idx)
        self.eval_embeddings.update(dataloader_idx, batch["idx"], emb)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0):
        self._eval_step(batch, dataloader_idx)

    def _eval_limited(self, stage: str) -> bool:
        """Whether the trainer embeds only part of the split (``limit_{val,test}_batches``,
        ``fast_dev_run``, ``overfit_batches``)."""
        limit = (
            self.trainer.limit_val_batches if stage == "val" else self.trainer.limit_test_batches
        )
        # Lightning keeps an int as a number of batches (fast_dev_run: 1) and 1.0 as "all".
        return isinstance(limit, int) or (limit is not None and limit < 1.0)

    def _finish_eval(self, stage: str) -> dict[str, dict[str, float]]:
        """Rank what this evaluation embedded (every rank's, :mod:`gpo_lit.metrics.collect`)."""
        from gpo_lit.eval_checks import coco_ids_for, stage_protocols

        # Lightning sets trainer.datamodule at run time; its hints lack it
        datamodule = self.trainer.datamodule  # type: ignore[attr-defined]
        split = datamodule.eval_split(stage)
        root = getattr(datamodule, "root", None)
        self.eval_embeddings.task = RankingTask(
            n_images=split.n_images,
            n_captions=split.n_captions,
            cap2img=split.cap2img,
            protocols=tuple(stage_protocols(self.eval_cfg, stage)),
            shard_size=self.eval_cfg.get("shard_size", 1024),
            ties=self.eval_cfg.get("ties", "pessimistic"),  # checkpoints before it: default
            coco_ids=lambda: self.coco_ids or coco_ids_for(self.eval_cfg, root, split),
            limited=self._eval_limited(stage),
        )
        try:
            results = self.eval_embeddings.compute()
        finally:
            self.eval_embeddings.reset()
            self.eval_embeddings.task = None
        ranked = self.eval_embeddings.ranked
        assert ranked is not None
        self.evaluated[stage] = ranked
        if ranked.subset:
            level = logging.DEBUG if stage in self._subset_said else logging.WARNING
            self._subset_said.add(stage)  # once per stage, not every validation epoch
            log.log(
                level,
                "%s on a subset (limited batches): %d of %d images and %d of %d captions; every "
                "protocol ranks this subset at once, and metrics.json records its size",
                stage, ranked.img.shape[0], split.n_images, ranked.cap.shape[0], split.n_captions,
            )  # fmt: skip
        return results

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self.eval_embeddings.reset()
            return
        (metrics,) = self._finish_eval("val").values()
        # Every rank computed the same numbers from the gathered embeddings.
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if k != "rsum"}, sync_dist=True)
        self.log("val/rsum", metrics["rsum"], prog_bar=True, sync_dist=True)
        # The best so far, what sweeps optimise (kept in checkpoints, so resuming continues it).
        self.val_rsum_best = max(self.val_rsum_best, float(metrics["rsum"]))
        self.log("val/rsum_best", self.val_rsum_best, sync_dist=True)

    def on_test_epoch_end(self) -> None:
        # Written to files by a callback (gpo_lit.callbacks.WriteEvaluation), rank zero.
        self.test_results = self._finish_eval("test")
        for protocol, metrics in self.test_results.items():
            self.log_dict({f"test/{protocol}/{k}": v for k, v in metrics.items()}, sync_dist=True)

    # -- checkpoints -----------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loss_watch.check_weights(
            checkpoint["state_dict"], self.global_step, self.current_epoch
        )
        if self.run_config is not None:
            checkpoint["gpo_lit_config"] = self.run_config
        checkpoint["gpo_lit_val_rsum_best"] = self.val_rsum_best
        checkpoint[random_state.KEY] = random_state.capture(self.trainer)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.val_rsum_best = float(checkpoint.get("gpo_lit_val_rsum_best", float("-inf")))
        state = checkpoint.get(random_state.KEY)  # checked with the checkpoint (train.py)
        if state is not None and state["mid_epoch"]:
            self._random_state = state
        elif state is not None:
            random_state.restore(state, self.global_rank, self.trainer.world_size)


# The evaluation settings the model reads. Any other stored key (older checkpoints kept output
# paths there, paths of the machine that wrote them) is dropped on load: outputs are the caller's.
EVALUATION_KEYS = ("val_protocol", "test_protocols", "shard_size", "ties", "coco_ids")


def check_model_hparams(path: str | Path, hp: dict) -> None:
    """One line unless ``hp`` holds the arguments of a :class:`VSEModel` (another model's
    checkpoint names other ones)."""
    import inspect

    params = inspect.signature(VSEModel).parameters
    required = [n for n, p in params.items() if p.default is inspect.Parameter.empty]
    odd = [k for k in hp if k not in params] + [f"no {k}" for k in required if k not in hp]
    expect(
        not odd,
        path,
        "the hyper_parameters of a gpo_lit VSEModel",
        f"those of another model ({', '.join(map(str, odd[:4]))})",
    )


def load_model(path: str | Path) -> tuple[VSEModel, dict | None]:
    """Rebuild a model from a gpo_lit checkpoint, read by
    :func:`gpo_lit.checkpoint_io.read_checkpoint` (``weights_only=True``; stored configs may name
    gpo_lit components only), with one-line errors for any other file.

    Returns the model in eval mode on the CPU and the run config stored with it (or None).
    """
    from gpo_lit.checkpoint_io import check_state_dict, read_checkpoint

    ckpt = read_checkpoint(path)
    hp = ckpt["hyper_parameters"]
    check_model_hparams(path, hp)
    evaluation = hp.get("evaluation")
    if isinstance(evaluation, dict):
        hp = {**hp, "evaluation": {k: v for k, v in evaluation.items() if k in EVALUATION_KEYS}}
    hp = {**hp, "compile": False}  # how the writing machine ran it, not part of the model
    try:
        model = VSEModel(**hp)
    except Exception as err:  # noqa: BLE001 - stored hyper-parameters are user input
        if user_error(err) is not None:
            raise
        raise GpoLitError(
            f"{path}: expected hyper_parameters that build a gpo_lit VSEModel, found "
            f"{first_line(err)}"
        ) from None
    check_state_dict(
        path,
        "the weights of the model its hyper_parameters describe",
        model.state_dict(),
        ckpt["state_dict"],
    )
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt.get("gpo_lit_config")
