"""The retrieval DataModule: training pairs and evaluation loaders over any split reader
(SCAN precomp region features by default; video frame stores plug in the same way)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from torch.utils.data import DataLoader, DistributedSampler

from gpo_lit.data.collate import Collate
from gpo_lit.data.datasets import Augment, CaptionDataset, ImageDataset, PairDataset
from gpo_lit.data.formats.base import SplitReader, open_split
from gpo_lit.data.formats.precomp import PrecompSplit
from gpo_lit.data.noise import mismatched_fraction, noisy_caption_map
from gpo_lit.data.sampling import EpochShuffleSampler, ResumableDataLoader
from gpo_lit.data.tokenize import CaptionTokenizer
from gpo_lit.data.workers import WorkerInit
from gpo_lit.errors import GpoLitError, expect

log = logging.getLogger(__name__)


def trainer_loggers(module: pl.LightningDataModule) -> list:
    """The loggers of the trainer ``module`` is attached to ([] when there is none)."""
    trainer = getattr(module, "trainer", None)
    return list(trainer.loggers) if trainer is not None else []


class RetrievalDataModule(pl.LightningDataModule):
    """Training pairs plus two evaluation loaders (images once, captions once) per split.

    Args:
        root: folder holding ``{split}_ims.npy``, ``{split}_caps.txt``, ``{split}_ids.txt``.
        train_split, val_split, test_split: split names (F30K: train/dev/test; COCO test: testall).
        val_max_images: validate on the first m images of ``val_split`` (1,000 in the paper).
        batch_size: the *global* training batch (split evenly over DDP ranks).
        eval_batch_size: per-process batch for embedding during evaluation.
        num_workers: DataLoader workers (each opens the feature files itself).
        augment: training augmentation, see :class:`Augment`.
        seed: seeds the data order and augmentation per (epoch, index).
        demo: when set, generate a demo data set into ``root`` first: the kwargs of
            ``demo_generator`` (a dotted function path called as ``fn(root, **demo)``;
            idempotent, it never overwrites a different data set).
        source_hint: appended to a missing-file error: where the files come from.
        reader: factory of the split reader (a ``_partial_`` node in configs; default
            :class:`PrecompSplit`), called with ``root``, ``split`` and ``max_images``. Any class with the reader interface
            (``n_images``, ``n_captions``, ``cap2img``, ``feat_dim``, ``path``, ``captions``,
            ``image(i) -> [n, D]``, ``caption(j)``) plugs in: video frame stores do.
        scan_finite_bytes: :meth:`check_splits` reads splits whose features take at most this
            many bytes whole, to find NaN/inf before any work (2 GiB: the dev and test splits of
            F30K and COCO); larger ones are checked per item as it is read, in the workers too.
        noise_ratio: noisy correspondences (REFERENCE §12): ⌊r·N⌋ training captions permuted
            among their slots once, from ``seed``; images, ids and evaluation data untouched.
            The fraction of training pairs actually mismatched is printed and logged as
            ``train/noise_mismatched``.
        noise_derangement: every permuted caption lands on another image, so exactly ⌊r·N⌋
            pairs are wrong; off = PCME++'s plain permutation (a few keep their own image).
        prefetch_factor: batches each worker loads ahead (None: PyTorch's 2; workers only).
            Workers persist across epochs and validations; memory is pinned on CUDA only.
    """

    def __init__(
        self,
        root: str,
        train_split: str = "train",
        val_split: str = "dev",
        test_split: str = "test",
        val_max_images: int | None = 1000,
        batch_size: int = 128,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        augment: dict | Augment | None = None,
        seed: int = 0,
        demo: dict | None = None,
        source_hint: str = "",
        demo_generator: str = "gpo_lit.data.demo.regions.generate_demo",
        reader: Callable[..., SplitReader] | None = None,
        scan_finite_bytes: int = 2 << 30,
        noise_ratio: float = 0.0,
        noise_derangement: bool = True,
        prefetch_factor: int | None = None,
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.val_max_images = val_max_images
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.augment = augment if isinstance(augment, Augment) else Augment(**(augment or {}))
        self.seed = seed
        self.demo = demo
        self.demo_generator = demo_generator
        self.source_hint = source_hint
        self.reader = reader or PrecompSplit
        self.scan_finite_bytes = scan_finite_bytes
        if not 0.0 <= float(noise_ratio) <= 1.0:
            raise GpoLitError(
                f"data.noise_ratio: expected a fraction in [0, 1], found {noise_ratio}"
            )
        self.noise_ratio = float(noise_ratio)
        self.noise_derangement = bool(noise_derangement)
        self.prefetch_factor = prefetch_factor
        self.tokenizer: CaptionTokenizer | None = None
        self._opened: dict[tuple[str, int | None], SplitReader] = {}

    # -- files -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.demo is not None:
            from hydra.utils import get_method

            get_method(self.demo_generator)(self.root, **self.demo)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.noise_ratio:
            _ = self.train_caption_map  # drawn (and checked) before any training step

    def split(self, name: str, max_images: int | None = None) -> SplitReader:
        """Open (once) and validate split ``name``; a missing file says where the data comes from."""
        key = (name, max_images)
        if key not in self._opened:
            self._opened[key] = open_split(
                self.reader, self.root, name, max_images, self.source_hint
            )
        return self._opened[key]

    def check_splits(
        self,
        stages: Sequence[str],
        in_dim: int | None = None,
        in_dim_key: str = "model.visual.in_dim",
        protocols: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        """Open and cross-check every split the ``stages`` ("train", "val", "test") will read,
        before any work, each problem one line.

        The readers check files, headers and counts on open; here: one feature width for all
        splits and the model's ``in_dim`` (the config key ``in_dim_key``: blamed when it differs
        from the training split, else the split is), a training split of at least one full batch
        (training drops the last partial batch), enough images for each stage's ``protocols``
        and finite features of every split of at most ``scan_finite_bytes``.
        """
        from gpo_lit.metrics.protocols import check_size

        opened = {
            stage: self.split(self.splits["train"]) if stage == "train" else self.eval_split(stage)
            for stage in stages
        }
        width, source = in_dim, in_dim_key
        if "train" in opened:
            train = opened["train"]
            if in_dim is not None and train.feat_dim != in_dim:
                raise GpoLitError(
                    f"{in_dim_key}: expected {train.feat_dim} (the feature width of "
                    f"{train.path}), found {in_dim}"
                )
            width, source = train.feat_dim, f"as {train.path}"
            expect(
                self.batch_size <= train.n_captions,
                "data.batch_size",
                f"at most the {train.n_captions} training captions of {train.path} (every "
                "training step takes a full batch)",
                self.batch_size,
            )
        for stage, split in opened.items():
            if width is not None:
                expect(
                    split.feat_dim == width,
                    split.path,
                    f"features of width {width} ({source})",
                    f"width {split.feat_dim}",
                )
            for name in (protocols or {}).get(stage, ()):
                check_size(name, split.n_images, where=f"the {stage} split {split.path}")
        for split in {id(s): s for s in opened.values()}.values():
            scan = getattr(split, "scan_finite", None)
            if scan is not None and split.feature_bytes() <= self.scan_finite_bytes:  # type: ignore[attr-defined]
                scan()

    @cached_property
    def vocabulary_captions(self) -> list[str]:
        """Training + validation captions: what the BiGRU vocabulary is counted over."""
        return list(self.split(self.splits["train"]).captions) + list(
            self.split(self.splits["val"]).captions
        )

    @cached_property
    def train_caption_map(self) -> np.ndarray | None:
        """The caption shown at each training slot (``data.noise_ratio``), None without noise;
        drawn once from the seed, so every rank and every epoch sees the same pairs."""
        if self.noise_ratio == 0:
            return None
        cap2img = self.split(self.splits["train"]).cap2img
        mapping = noisy_caption_map(cap2img, self.noise_ratio, self.seed, self.noise_derangement)
        self.noise_mismatched = mismatched_fraction(cap2img, mapping)
        log.info(
            "data.noise_ratio=%s: %d of %d training captions (%.2f %%) shown with another image",
            self.noise_ratio,
            round(self.noise_mismatched * len(cap2img)),
            len(cap2img),
            100 * self.noise_mismatched,
        )
        return mapping

    def set_tokenizer(self, tokenizer: CaptionTokenizer) -> None:
        self.tokenizer = tokenizer

    # -- loaders ---------------------------------------------------------------------------
    def _collate(self) -> Collate:
        if self.tokenizer is None:
            raise RuntimeError("RetrievalDataModule.set_tokenizer() must be called before loading")
        return Collate(self.tokenizer.pad_id)

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _loader_kwargs(self) -> dict:
        """Worker settings of every loader: workers kept alive across epochs and validations (the
        epoch travels with the sampler's indices, not in the dataset), deaf to the stop signals
        a scheduler sends every process (:class:`~gpo_lit.data.workers.WorkerInit`), pinned
        memory for CUDA."""
        trainer = getattr(self, "trainer", None)
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        kwargs: dict = {"num_workers": self.num_workers, "pin_memory": cuda}
        if self.num_workers > 0:
            kwargs["persistent_workers"] = True
            kwargs["worker_init_fn"] = WorkerInit(trainer.global_rank if trainer else 0)
            if self.prefetch_factor is not None:
                kwargs["prefetch_factor"] = self.prefetch_factor
        return kwargs

    def train_dataloader(self) -> DataLoader:
        split = self.split(self.splits["train"])
        world = self._world_size()
        if self.batch_size % world:
            raise GpoLitError(
                f"data.batch_size: expected a multiple of the {world} processes (it is the "
                f"global batch), found {self.batch_size}"
            )
        assert self.tokenizer is not None, "set_tokenizer() first"  # for the type checker
        dataset = PairDataset(
            split,
            self.tokenizer,
            self.augment,
            self.seed,
            caption_map=self.train_caption_map,
            deferred=True,  # regions read by the collate straight into the batch
        )
        if self.train_caption_map is not None:
            for logger in trainer_loggers(self):  # stored with the run (metrics.csv, W&B)
                logger.log_metrics({"train/noise_mismatched": self.noise_mismatched}, step=0)
        return ResumableDataLoader(
            dataset,
            batches_done=self._batches_done_this_epoch,
            batch_size=self.batch_size // world,
            sampler=EpochShuffleSampler(len(dataset), seed=self.seed),
            drop_last=True,
            collate_fn=self._collate(),
            **self._loader_kwargs(),
        )

    def _batches_done_this_epoch(self, loader_batches: int) -> int:
        """Training batches of the current epoch already done (one optimiser step per batch)."""
        trainer = self.trainer
        assert trainer is not None  # called by the training loader, inside fit
        limit = trainer.limit_train_batches
        per_epoch = loader_batches
        if isinstance(limit, int):
            per_epoch = min(per_epoch, limit)
        elif limit is not None and limit < 1.0:
            per_epoch = int(per_epoch * limit)
        return trainer.global_step - trainer.current_epoch * per_epoch

    def eval_loaders(self, split: SplitReader) -> list[DataLoader]:
        """[images once, captions once] for ``split``; order is kept, indices travel along."""
        kwargs = {
            "batch_size": self.eval_batch_size,
            "collate_fn": self._collate(),
            **self._loader_kwargs(),
        }
        assert self.tokenizer is not None  # _collate() raised otherwise
        datasets = [ImageDataset(split), CaptionDataset(split, self.tokenizer)]
        if self._world_size() == 1:
            return [DataLoader(ds, shuffle=False, **kwargs) for ds in datasets]
        # Each rank embeds a shard; the sampler pads by repeating items, and the model
        # de-duplicates by dataset index after gathering.
        return [
            DataLoader(ds, sampler=DistributedSampler(ds, shuffle=False), **kwargs)
            for ds in datasets
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders(self.split(self.splits["val"], self.val_max_images))

    def test_dataloader(self) -> list[DataLoader]:
        return self.eval_loaders(self.split(self.splits["test"]))

    def eval_split(self, stage: str) -> SplitReader:
        """The split a ``val``/``test`` stage evaluates (for its caption → image map)."""
        if stage == "val":
            return self.split(self.splits["val"], self.val_max_images)
        return self.split(self.splits["test"])
