"""Map-style datasets over a split: training pairs, and images / captions embedded once each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from gpo_lit.data.augment import drop_regions, kept_regions, perturb_words
from gpo_lit.data.formats.base import SplitReader
from gpo_lit.data.formats.precomp import PrecompSplit, RegionRead
from gpo_lit.data.tokenize import CaptionTokenizer


@dataclass(frozen=True)
class Augment:
    """Training-time augmentation (REFERENCE §4); ``None`` / 0 switches a part off.

    Attributes:
        region_keep_prob: each region kept independently with this probability (0.8).
        word_prob: each word perturbed with this probability (0.2) …
        word_mask_prob: … then masked (0.5), replaced by random ids (0.1), else deleted.
        word_random_prob: see above.
        perturb_specials: also perturb the caption's special tokens, each like a word. None (the
            default): as the released code for the tokenizer
            (``CaptionTokenizer.perturb_specials_default``): yes for the BiGRU vocabulary's
            ``<start>``/``<end>``, no for Hugging Face tokenizers' ``[CLS]``/``[SEP]``.
        per_token: perturb each token on its own instead of all pieces of a word together, as
            PCME++ does on CLIP's BPE tokens (REFERENCE §12); off = VSE∞'s whole words (§4).
    """

    region_keep_prob: float | None = 0.8
    word_prob: float = 0.2
    word_mask_prob: float = 0.5
    word_random_prob: float = 0.1
    perturb_specials: bool | None = None
    per_token: bool = False


class PairDataset(Dataset):
    """One item per caption slot: (its image's regions, its token ids), augmented.

    Indexed by ``(caption index, epoch)`` pairs from :class:`EpochShuffleSampler`; the
    augmentation RNG is seeded by ``(seed, epoch, index)`` so workers and resumed runs agree.
    ``caption_map`` (noisy correspondences, ``gpo_lit.data.noise``) shows caption
    ``caption_map[j]`` at slot j, with slot j's image; None = every caption with its own image.
    ``deferred``: precomp regions come as a :class:`gpo_lit.data.formats.precomp.RegionRead`, read by
    the collate straight into the batch (the training loader); False = a tensor per item.
    """

    def __init__(
        self,
        split: SplitReader,
        tokenizer: CaptionTokenizer,
        augment: Augment,
        seed: int = 0,
        caption_map: np.ndarray | None = None,
        deferred: bool = False,
    ) -> None:
        self.split = split
        self.caption_map = caption_map
        self.deferred = deferred
        self.tokenizer = tokenizer
        self.augment = augment
        self.seed = seed
        specials = augment.perturb_specials
        self.perturb_specials = tokenizer.perturb_specials_default if specials is None else specials

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, key: tuple[int, int] | int) -> dict:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        rng = np.random.default_rng((self.seed, epoch, index))
        image = int(self.split.cap2img[index])
        train_image = getattr(self.split, "train_image", None)  # raw images: random crop/flip
        aug = self.augment
        p_keep = 1.0 if aug.region_keep_prob is None else aug.region_keep_prob
        drop = p_keep < 1
        feats: np.ndarray | RegionRead
        if drop and train_image is None and isinstance(self.split, PrecompSplit):
            # the same draws as drop_regions, but only the kept regions are copied out
            keep = kept_regions(self.split.n_regions, rng, p_keep=p_keep)
            if self.deferred:
                feats = self.split.deferred_image(image, keep=keep)
            else:
                feats = self.split.image(image, keep=keep)
        else:
            feats = train_image(image, rng) if train_image is not None else self.split.image(image)
            if drop:
                feats = drop_regions(feats, rng, p_keep=p_keep)
        shown = index if self.caption_map is None else int(self.caption_map[index])
        ids, word_ids = self.tokenizer.encode(self.split.caption(shown))
        if aug.per_token:  # every non-special token a "word" of its own
            word_ids = [None if w is None else k for k, w in enumerate(word_ids)]
        if aug.word_prob > 0:
            ids = perturb_words(
                ids,
                word_ids,
                mask_id=self.tokenizer.mask_id,
                vocab_size=self.tokenizer.vocab_size,
                rng=rng,
                p=aug.word_prob,
                p_mask=aug.word_mask_prob,
                p_random=aug.word_random_prob,
                perturb_specials=self.perturb_specials,
            )
        img = feats if isinstance(feats, RegionRead) else torch.from_numpy(feats)
        return {"img": img, "cap": ids, "img_idx": image, "cap_idx": index}


class ImageDataset(Dataset):
    """Each unique image once: ``{"img": [R, D], "idx": i}``."""

    def __init__(self, split: SplitReader) -> None:
        self.split = split

    def __len__(self) -> int:
        return self.split.n_images

    def __getitem__(self, index: int) -> dict:
        return {"img": torch.from_numpy(self.split.image(index)), "idx": index}


class CaptionDataset(Dataset):
    """Each caption once: ``{"cap": ids, "idx": j}``."""

    def __init__(self, split: SplitReader, tokenizer: CaptionTokenizer) -> None:
        self.split = split
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return self.split.n_captions

    def __getitem__(self, index: int) -> dict:
        return {"cap": self.tokenizer.encode(self.split.caption(index))[0], "idx": index}
