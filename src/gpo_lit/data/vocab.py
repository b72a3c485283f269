"""Word vocabulary for the BiGRU text encoder (REFERENCE.md §2), SCAN-compatible on disk.

Ids: ``<pad>=0, <start>=1, <end>=2, <unk>=3, <mask>=4`` then words by descending count (ties by
the word itself, so a rebuild is byte-identical). SCAN / VSE∞ vocab files are read as they are:
their ids are kept, and ``<mask>`` is appended when the file lacks it.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from gpo_lit.errors import GpoLitError, expect

PAD, START, END, UNK, MASK = "<pad>", "<start>", "<end>", "<unk>", "<mask>"
SPECIALS = (PAD, START, END, UNK, MASK)
_REQUIRED = (PAD, START, END, UNK)  # SCAN files may predate <mask>

# Roughly nltk.word_tokenize on lower-cased text (which built the SCAN vocab files), without nltk:
# "don't" -> do n't, "dog's" -> dog 's, "half-pipe" stays one word, "3.5" / "1,000" stay one
# number, "..." is one token, any other punctuation mark is its own token. Unlike nltk, double
# quotes are not rewritten to `` / '' and abbreviations such as "u.s." are split at the dots.
_TOKEN = re.compile(
    r"""
      \w+?(?=n't\b)              # stem before n't: "don't" -> "do", "can't" -> "ca"
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b      # clitics: 's 're 've 'll 'd 'm
    | \d+(?:[.,]\d+)+            # numbers with a decimal point or thousands separators
    | \w+(?:-\w+)*               # words, hyphenated compounds kept together
    | \.\.\.|--                  # ellipsis, dash
    | [^\w\s]                    # any other single punctuation mark
    """,
    re.VERBOSE,
)


def tokenize_words(caption: str) -> list[str]:
    """Lower-cased word tokens with punctuation split off, e.g. ``"A dog's ball."`` →
    ``["a", "dog", "'s", "ball", "."]``."""
    return _TOKEN.findall(caption.lower())


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
        return cls([*SPECIALS, *words])

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

        Ids in the file are kept as they are; ``<mask>`` is appended if absent (older SCAN files).
        Raises ``GpoLitError`` naming the file for unreadable / invalid JSON, missing keys,
        inconsistent ``word2idx`` / ``idx2word`` or missing ``<pad> <start> <end> <unk>``.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise GpoLitError(f"{path}: cannot read vocabulary file ({e.strerror or e})") from None
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
        missing = [s for s in _REQUIRED if s not in word2idx]
        expect(not missing, path, f"special tokens {list(_REQUIRED)}", f"{missing} missing")
        if MASK not in word2idx:
            words.append(MASK)
        return cls(words)
