"""One caption-tokenizer interface for both text encoders (BiGRU vocabulary, Hugging Face).

``encode`` returns token ids *with* the special tokens plus, per id, the index of the word it came
from (``None`` for specials). Caption augmentation (``data.augment.perturb_words``) works on these
ids and word indices, so it treats all pieces of a word together without any tokenizer internals
(the transformers-5 slow-tokenizer internals the released code used are gone).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

from gpo_lit.data.vocab import Vocabulary, tokenize_words
from gpo_lit.errors import GpoLitError, first_line


@runtime_checkable
class CaptionTokenizer(Protocol):
    """What datasets and collate need from a tokenizer."""

    pad_id: int
    mask_id: int
    vocab_size: int
    #: whether the released code's caption augmentation perturbs this tokenizer's special tokens
    #: like words (the default of ``data.augment.perturb_specials``)
    perturb_specials_default: bool

    def encode(self, caption: str) -> tuple[list[int], list[int | None]]:
        """``(ids, word_ids)`` of equal length; ids include specials, whose word id is None."""
        ...


class VocabTokenizer:
    """BiGRU captions: ``<start> w1 … wn <end>``, one id per word (unknown words → ``<unk>``).

    The released BiGRU code perturbs ``<start>``/``<end>`` like words in its caption augmentation.
    """

    perturb_specials_default = True

    def __init__(self, vocab: Vocabulary) -> None:
        self.vocab = vocab
        self.pad_id = vocab.pad_id
        self.mask_id = vocab.mask_id
        self.vocab_size = len(vocab)

    def encode(self, caption: str) -> tuple[list[int], list[int | None]]:
        words = tokenize_words(caption)
        ids = [self.vocab.start_id, *(self.vocab(w) for w in words), self.vocab.end_id]
        word_ids: list[int | None] = [None, *range(len(words)), None]
        return ids, word_ids


def _not_found_message(name_or_path: str, err: Exception) -> str:
    """One line: what was looked for, that nothing is downloaded, and how to provide it."""
    from huggingface_hub.constants import HF_HUB_CACHE

    where = f"text tokenizer {name_or_path!r}"
    if Path(name_or_path).expanduser().is_dir():
        return f"{where}: expected a Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json), found none loadable (gpo_lit never downloads) [{first_line(err)}]"
    if name_or_path.startswith(("/", ".", "~")):
        return f"{where}: no such directory (gpo_lit never downloads); pass a directory written by `AutoTokenizer.from_pretrained(NAME).save_pretrained(DIR)`"
    return (
        f"{where}: not a local directory and not in the local Hugging Face cache ({HF_HUB_CACHE}); "
        f"gpo_lit never downloads. Fetch it once where there is network (`hf download {name_or_path}`) "
        f"or pass a directory written by `save_pretrained`"
    )


class HFTokenizer:
    """A Hugging Face fast tokenizer from a local directory or the local HF cache (never the network).

    ``encode`` gives e.g. ``[CLS] a snow ##board ##er [SEP]`` with word ids ``[None, 0, 1, 1, 1,
    None]``. Captions longer than ``max_length`` tokens are truncated keeping the final special
    token (the last word may lose trailing pieces).

    ``vocab_size`` is the base vocabulary (``tokenizer.vocab_size``, without added tokens), the
    pool the released code draws random replacement tokens from.

    CLIP's tokenizer (``openai/clip-vit-base-patch32``): ``<|startoftext|> … <|endoftext|>``, 77
    tokens at most, word ids from its pre-tokenizer (``dog's`` is two words, ``dog`` and ``'s``),
    and no mask token: ``mask_token`` names the one to mask with (PCME++ uses ``M``).

    Args:
        name_or_path: a directory holding ``tokenizer.json`` (+ config), or a hub name already in
            the local HF cache, e.g. ``bert-base-uncased``.
        max_length: most tokens per caption, specials included; None = the tokenizer's
            ``model_max_length`` (77 for CLIP). Never more than that (the model's positions).
        mask_token: the token that masks perturbed words (None = the tokenizer's mask token).

    The released BERT code adds ``[CLS]``/``[SEP]`` after its caption augmentation: they are
    never perturbed.
    """

    perturb_specials_default = False

    def __init__(
        self, name_or_path: str, max_length: int | None = 128, mask_token: str | None = None
    ) -> None:
        from transformers import AutoTokenizer  # heavy import; only BERT-style configs need it

        self.name_or_path = str(name_or_path)
        try:
            tok = AutoTokenizer.from_pretrained(
                self.name_or_path, use_fast=True, local_files_only=True
            )
        except (OSError, ValueError) as e:
            raise GpoLitError(_not_found_message(self.name_or_path, e)) from None
        if not getattr(tok, "is_fast", False):
            raise GpoLitError(
                f"text tokenizer {self.name_or_path!r}: expected a fast tokenizer (tokenizer.json), found {type(tok).__name__}"
            )
        if tok.pad_token_id is None:
            raise GpoLitError(
                f"text tokenizer {self.name_or_path!r}: expected a pad token (caption padding), found none"
            )
        mask_id = tok.mask_token_id if mask_token is None else tok.convert_tokens_to_ids(mask_token)
        if mask_id is None or (mask_token is not None and mask_id == tok.unk_token_id):
            raise GpoLitError(
                f"model.text.tokenizer.mask_token: expected a token of {self.name_or_path!r} to mask "
                f"perturbed words with (it has no mask token of its own), found "
                f"{'none' if mask_token is None else repr(mask_token) + ' (not in its vocabulary)'}"
            )
        limit = tok.model_max_length if tok.model_max_length < 1_000_000 else None  # 1e30: unset
        if max_length is None:
            if limit is None:
                raise GpoLitError(
                    f"model.text.tokenizer.max_length: expected a number ({self.name_or_path!r} "
                    f"sets no model_max_length), found null"
                )
            max_length = limit
        n_special = tok.num_special_tokens_to_add()
        if max_length < n_special + 1 or (limit is not None and max_length > limit):
            bound = f" and <= {limit} (the tokenizer's model_max_length)" if limit else ""
            raise GpoLitError(
                f"text tokenizer max_length: expected >= {n_special + 1}{bound}, found {max_length}"
            )
        self.tokenizer = tok
        self.max_length = int(max_length)
        self.pad_id: int = tok.pad_token_id
        assert not isinstance(mask_id, list)  # one token in, one id out
        self.mask_id: int = int(mask_id)
        self.vocab_size: int = tok.vocab_size

    def encode(self, caption: str) -> tuple[list[int], list[int | None]]:
        enc = self.tokenizer(caption, truncation=True, max_length=self.max_length)
        return list(enc["input_ids"]), list(enc.word_ids())
