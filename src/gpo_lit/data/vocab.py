"""Word vocabulary for the BiGRU text encoder (REFERENCE.md §2), SCAN-compatible on disk.

Words are nltk's Treebank-style word tokens of the lower-cased caption (:func:`tokenize_words`),
as the released code tokenizes. Ids: ``<pad>=0, <start>=1, <end>=2, <unk>=3``, then the words
counted at least ``min_count`` times by descending count (ties by the word itself, so a rebuild
is byte-identical), then ``<mask>``: the released code's layout (SCAN's vocabulary file, to
which its training script appends ``<mask>``). SCAN / VSE∞ vocab files are read as they are:
their ids are kept, and ``<mask>`` is appended when the file lacks it.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from gpo_lit.errors import GpoLitError, expect, require_file

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
SPECIALS = (PAD, START, END, UNK, MASK)
_REQUIRED = (PAD, START, END, UNK)  # SCAN files may predate <mask>

# Fast path for the common caption: lower-case ASCII letters, digits, hyphens, commas and spaces,
# maybe one final period. nltk's tokenizer (~30 regex passes, ~0.1 ms a caption; the fast path
# a few µs) then only detaches commas not followed by a digit ("1,000" stays whole) and the final
# period and splits on whitespace, except for "--", ",," and the contractions below ("cannot" ->
# "can not"), which take the nltk path. tests/test_text.py checks the two agree.
_PLAIN = re.compile(r"[a-z0-9, -]*(?:[a-z0-9]\. *)?")
_NLTK_SPLITS = re.compile(r"--|,,|\b(?:cannot|gimme|gonna|gotta|lemme|wanna)\b")
_COMMA = re.compile(r",(?!\d)")


@functools.cache
def _nltk_words() -> Callable[[str], list[str]]:
    """nltk's word tokenizer on one line of text (import ~1 s: only BiGRU runs pay it)."""
    from nltk.tokenize import word_tokenize

    return functools.partial(word_tokenize, preserve_line=True)


def tokenize_words(caption: str) -> list[str]:
    """``nltk.word_tokenize(caption.lower(), preserve_line=True)``, e.g. ``"A dog's ball."`` →
    ``["a", "dog", "'s", "ball", "."]``, ``"Don't"`` → ``["do", "n't"]``, ``'"Stop"'`` →
    ``["``", "stop", "''"]``.

    The released code calls ``nltk.word_tokenize(caption.lower())``, which first splits
    sentences with punkt, a model nltk downloads. Without it (``preserve_line``) only the
    caption's final period is split off: in a caption of several sentences an inner period stays
    on its word (``"a dog. a cat."`` → ``a dog. a cat .``), where punkt gives ``a dog . a cat .``.
    """
    text = caption.lower()
    if _PLAIN.fullmatch(text) and not _NLTK_SPLITS.search(text):
        words = _COMMA.sub(" , ", text).split()
        if words and words[-1].endswith("."):
            words[-1:] = [words[-1][:-1], "."]
        return words
    return _nltk_words()(text)


class Vocabulary:
    """Word ↔ id map. ``vocab(word)`` gives the id, ``<unk>``'s for unknown words.

    Args:
        idx2word: the words in id order; must hold all of ``SPECIALS`` exactly once.
    """

    def __init__(self, idx2word: Sequence[str]) -> None:
        self.idx2word: list[str] = list(idx2word)
        self.word2idx: dict[str, int] = {w: i for i, w in enumerate(self.idx2word)}
        if len(self.word2idx) != len(self.idx2word):
            dup = [w for w, c in Counter(self.idx2word).items() if c > 1][:5]
            raise GpoLitError(f"Vocabulary: expected unique words, found duplicates {dup}")
        missing = [s for s in SPECIALS if s not in self.word2idx]
        if missing:
            raise GpoLitError(
                f"Vocabulary: expected special tokens {list(SPECIALS)}, found {missing} missing"
            )
        self.pad_id = self.word2idx[PAD]
        self.start_id = self.word2idx[START]
        self.end_id = self.word2idx[END]
        self.unk_id = self.word2idx[UNK]
        self.mask_id = self.word2idx[MASK]

    @classmethod
    def from_words(cls, idx2word: Sequence[str]) -> Vocabulary:
        """The vocabulary whose id ``i`` is ``idx2word[i]`` (inverse of ``vocab.idx2word``)."""
        return cls(idx2word)

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 4) -> Vocabulary:
        """Vocabulary of the words occurring at least ``min_count`` times in ``captions``
        (REFERENCE: count ≥ 4 over train + dev captions)."""
        if min_count < 1:
            raise ValueError(f"Vocabulary.build: min_count must be >= 1, got {min_count}")
        counts: Counter[str] = Counter()
        for caption in captions:
            counts.update(tokenize_words(caption))
        words = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIALS),
            key=lambda w: (-counts[w], w),
        )
        return cls([PAD, START, END, UNK, *words, MASK])

    def __len__(self) -> int:
        return len(self.idx2word)

    def __call__(self, word: str) -> int:
        return self.word2idx.get(word, self.unk_id)

    def __contains__(self, word: object) -> bool:
        return word in self.word2idx

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.idx2word == other.idx2word

    __hash__ = None  # type: ignore[assignment]  # mutable lists inside

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} words)"

    def save(self, path: str | Path) -> None:
        """Write SCAN's JSON layout: ``{"word2idx": {...}, "idx2word": {"0": ...}, "idx": n}``."""
        data = {
            "word2idx": self.word2idx,
            "idx2word": {str(i): w for i, w in enumerate(self.idx2word)},
            "idx": len(self),
        }
        Path(path).write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary JSON (ours or SCAN's / VSE∞'s), validating it.

        Ids in the file are kept as they are; ``<mask>`` is appended if absent (SCAN's files lack
        it; the released training script appends it the same way, at id ``idx``). The one place
        a vocabulary file is read (training's ``vocab_file``, ``convert --vocab``).
        Raises ``GpoLitError`` naming the file for a missing file, invalid JSON, missing keys,
        inconsistent ``word2idx`` / ``idx2word`` / ``idx`` or missing ``<pad> <start> <end>
        <unk>``.
        """
        path = Path(path)
        require_file(path, "a vocabulary JSON file (SCAN layout)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise GpoLitError(
                f"{path}: expected a readable vocabulary file, found {e.strerror or e}"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise GpoLitError(
                f"{path}: expected a JSON vocabulary file, found invalid JSON ({e})"
            ) from None
        layout = 'a JSON object with keys "word2idx", "idx2word", "idx" (SCAN vocab layout)'
        expect(isinstance(data, dict), path, layout, type(data).__name__)
        expect(
            all(k in data for k in ("word2idx", "idx2word", "idx")),
            path,
            layout,
            f"keys {sorted(data)}",
        )

        word2idx, idx2word = data["word2idx"], data["idx2word"]
        expect(
            isinstance(word2idx, dict) and len(word2idx) > 0,
            path,
            '"word2idx" to be a non-empty object',
            type(word2idx).__name__,
        )
        bad = [w for w, i in word2idx.items() if type(i) is not int]
        expect(not bad, path, '"word2idx" values to be integer ids', f"{bad[:3]}")
        n = len(word2idx)
        expect(
            sorted(word2idx.values()) == list(range(n)),
            path,
            f'"word2idx" ids to be exactly 0..{n - 1}',
            "duplicate or missing ids",
        )
        words = [""] * n
        for w, i in word2idx.items():
            words[i] = w
        expect(
            isinstance(idx2word, dict), path, '"idx2word" to be an object', type(idx2word).__name__
        )
        expect(
            idx2word == {str(i): w for i, w in enumerate(words)},
            path,
            '"idx2word" to be the inverse of "word2idx"',
            "a mismatch",
        )
        idx = data["idx"]
        expect(type(idx) is int and idx == n, path, f'"idx" to be the word count {n}', repr(idx))
        missing = [s for s in _REQUIRED if s not in word2idx]
        expect(not missing, path, f"special tokens {list(_REQUIRED)}", f"{missing} missing")
        if MASK not in word2idx:
            words.append(MASK)
        return cls(words)
