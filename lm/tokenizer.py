"""Character-level tokenizer: one id per distinct character of the corpus (or per byte value, for a byte corpus)."""

from __future__ import annotations

import codecs

import numpy as np

from lm.errors import DataError


class CharTokenizer:
    """Maps characters to ids by their rank in the sorted vocabulary.

    Encoding is vectorised: text becomes an array of code points, and `np.searchsorted` finds each one's
    rank, so there is no Python loop per character.

    With `byte_level` (a corpus read as bytes, `data.encoding=bytes`: enwik8), each symbol is one byte, written as
    the character of that value (latin-1); `to_symbols` and `to_text` convert between such symbols and text.
    """

    def __init__(self, vocab: str, byte_level: bool = False):
        if not vocab:
            raise DataError("The vocabulary is empty: the corpus has no characters.")
        if list(vocab) != sorted(set(vocab)):
            raise DataError("The vocabulary must be sorted unique characters.")
        if byte_level and ord(vocab[-1]) > 255:
            raise DataError("A byte-level vocabulary holds the characters U+0000-U+00FF only (one per byte value).")
        self.vocab, self.byte_level = vocab, byte_level
        self._codepoints = np.array([ord(c) for c in vocab], dtype=np.uint32)
        # A direct lookup table is far faster than a binary search for the common case (no code point past
        # U+FFFF); -1 marks characters outside the vocabulary.
        self._table = None
        if self._codepoints[-1] < 65536:
            self._table = np.full(65536, -1, dtype=np.int32)
            self._table[self._codepoints] = np.arange(len(vocab), dtype=np.int32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Builds the vocabulary from every character that occurs in `text`."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned integer type that holds every id."""
        return np.dtype(np.uint8 if self.vocab_size <= 256 else np.uint16 if self.vocab_size <= 65536 else np.uint32)

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as a compact unsigned integer array."""
        return self.encode_codepoints(text_to_codepoints(text))

    def encode_codepoints(self, codepoints: np.ndarray) -> np.ndarray:
        """Ids of an array of code points; raises `DataError` naming any character not in the vocabulary."""
        if self._table is not None and (codepoints.size == 0 or codepoints.max() < 65536):
            ids = self._table[codepoints]
            unknown = ids < 0
        else:
            ids = np.minimum(np.searchsorted(self._codepoints, codepoints), self.vocab_size - 1)
            unknown = self._codepoints[ids] != codepoints
        if unknown.any():
            missing = sorted({chr(c) for c in codepoints[unknown].tolist()})
            raise DataError(
                f"These characters are not in the model's vocabulary: {' '.join(repr(c) for c in missing)}; "
                "remove them from the text."
            )
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        """Turns a sequence of ids (list, array or tensor) back into text."""
        ids = np.asarray(ids.tolist() if hasattr(ids, "tolist") else ids, dtype=np.int64)
        # through code points, not a numpy str array: numpy drops a string's trailing "\x00", and byte corpora have it
        return self._codepoints[ids].astype("<u4").tobytes().decode("utf-32-le", errors="surrogatepass")

    def to_symbols(self, text: str) -> str:
        """The model's symbols for `text`: the text itself, or for a byte-level model its UTF-8 bytes."""
        return text.encode("utf-8").decode("latin-1") if self.byte_level else text

    def to_text(self, symbols: str) -> str:
        """Readable text from the model's symbols: themselves, or for a byte-level model its bytes read as UTF-8
        (bytes that form no UTF-8 character show as U+FFFD)."""
        return symbols.encode("latin-1").decode("utf-8", errors="replace") if self.byte_level else symbols

    def text_stream(self):
        """A function that turns symbols arriving a few at a time into readable text as soon as it is complete (a
        byte-level model's multi-byte characters wait for their last byte); call it with final=True at the end."""
        if not self.byte_level:
            return lambda symbols, final=False: symbols
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda symbols, final=False: decoder.decode(symbols.encode("latin-1"), final)


def text_to_codepoints(text: str) -> np.ndarray:
    """The Unicode code point of every character of `text`, without a Python loop."""
    return np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
