"""The retrieval DataModule: training pairs and evaluation loaders over any split reader
(SCAN precomp region features by default; video frame stores plug in the same way)."""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path

import pytorch_lightning as pl
from torch.utils.data import DataLoader, DistributedSampler

from gpo_lit.data.collate import Collate
from gpo_lit.data.datasets import Augment, CaptionDataset, ImageDataset, PairDataset
from gpo_lit.data.precomp import PrecompSplit
from gpo_lit.data.reader import SplitReader, open_split
from gpo_lit.data.sampling import EpochShuffleSampler, ResumableDataLoader
from gpo_lit.data.tokenize import CaptionTokenizer
from gpo_lit.errors import GpoLitError


class RetrievalDataModule(pl.LightningDataModule):
    """Training pairs plus two evaluation loaders (images once, captions once) per split.

    Args:
        root: folder holding ``{split}_ims.npy``, ``{split}_caps.txt``, ``{split}_ids.txt``.
        train_split, val_split, test_split: split names (F30K: train/dev/test; COCO test: testall).
        val_max_images: validate on the first m images of ``val_split`` (1,000 in the paper).
        batch_size: the *global* training batch (split evenly over DDP ranks).
        eval_batch_size: per-process batch for embedding during evaluation.
        num_workers: DataLoader workers (each opens the memory maps itself).
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
        demo_generator: str = "gpo_lit.data.demo.generate_demo",
        reader: Callable[..., SplitReader] | None = None,
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
        self.tokenizer: CaptionTokenizer | None = None
        self._opened: dict[tuple[str, int | None], SplitReader] = {}

    # -- files -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        if self.demo is not None:
            from hydra.utils import get_method

            get_method(self.demo_generator)(self.root, **self.demo)

    def split(self, name: str, max_images: int | None = None) -> SplitReader:
        """Open (once) and validate split ``name``; a missing file says where the data comes from."""
        key = (name, max_images)
        if key not in self._opened:
            self._opened[key] = open_split(
                self.reader, self.root, name, max_images, self.source_hint
            )
        return self._opened[key]

    @cached_property
    def vocabulary_captions(self) -> list[str]:
        """Training + validation captions: what the BiGRU vocabulary is counted over."""
        return list(self.split(self.splits["train"]).captions) + list(
            self.split(self.splits["val"]).captions
        )

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

    def train_dataloader(self) -> DataLoader:
        split = self.split(self.splits["train"])
        world = self._world_size()
        if self.batch_size % world:
            raise GpoLitError(
                f"data.batch_size: expected a multiple of the {world} processes (it is the "
                f"global batch), found {self.batch_size}"
            )
        dataset = PairDataset(split, self.tokenizer, self.augment, self.seed)
        return ResumableDataLoader(
            dataset,
            batches_done=self._batches_done_this_epoch,
            batch_size=self.batch_size // world,
            sampler=EpochShuffleSampler(len(dataset), seed=self.seed),
            drop_last=True,
            collate_fn=self._collate(),
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def _batches_done_this_epoch(self, loader_batches: int) -> int:
        """Training batches of the current epoch already done (one optimiser step per batch)."""
        trainer = self.trainer
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
            "num_workers": self.num_workers,
        }
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
