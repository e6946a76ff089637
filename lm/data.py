"""The character corpus: download, one-pass encoding to a memory-mapped id cache, and the Lightning data module.

A corpus of any size is read in chunks, never as one Python string. Its ids are cached next to it (or in a
cache folder when that directory is read-only), keyed by the corpus's sha256, and training memory-maps that
cache. Training batches are drawn as whole arrays: random window offsets and one vectorised gather.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import secrets
import sys
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lm.errors import ConfigError, DataError, is_count, is_number
from lm.tokenizer import CharTokenizer, text_to_codepoints

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
IGNORE_INDEX = -100  # targets with this id do not count in the loss
CHUNK_BYTES = 16 * 1024 * 1024
CACHE_FORMAT = 2  # 2: the index records the number of ids and their crc32
ENCODINGS = {"utf-8": "utf-8", "bytes": "latin-1"}  # bytes: each byte is one character (latin-1 maps 0-255 to itself)


# --------------------------------------------------------------------------------------------------------------
# Files: atomic writes and a checked download


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it into place.

    A crash or a concurrent writer never leaves a half-written `path`; the temporary file is removed on error.
    The file gets the permissions any new file in that folder gets (0666 less the umask), not mkstemp's 0600, so
    the other users of a shared data folder can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def download(url: str, dest: Path, sha256: str | None, timeout: float = 60.0, corpus: Path | None = None) -> None:
    """Downloads `url` to `dest` atomically, checking its sha256; a mismatched download leaves nothing behind.
    `corpus`: where the user may put the corpus instead (when `dest` is an archive of it), for the error message."""
    corpus = corpus or dest

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError) as error:
            raise DataError(
                f"Could not download {url} ({getattr(error, 'reason', error)}); put the file at {corpus} yourself "
                "or pass data.path=/path/to/corpus.txt."
            ) from error
        if sha256 and digest.hexdigest() != sha256:
            raise DataError(
                f"The download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; it was discarded. "
                f"Put a correct copy at {dest} or pass data.path=/path/to/corpus.txt."
            )

    print(f"Downloading {url} -> {dest}", flush=True)
    write_atomically(dest, fetch)


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_corpus(
    url: str, dest: Path, sha256: str | None, size: int | None = None, archive_member: str | None = None
) -> None:
    """Downloads a corpus to `dest` once: the file itself, or with `archive_member` a zip holding it, which is
    extracted and then deleted. The corpus's size (bytes) and sha256 are checked; a mismatch leaves nothing behind."""
    if archive_member is None:
        download(url, dest, sha256)
    else:
        archive = dest.parent / f"{dest.name}.zip"
        download(url, archive, None, corpus=dest)  # mirrors re-pack archives: the corpus inside is what is checked
        try:
            write_atomically(dest, lambda tmp: _extract(archive, archive_member, tmp, url))
        finally:
            archive.unlink(missing_ok=True)
        if sha256 and (digest := _file_sha256(dest)) != sha256:
            dest.unlink()
            raise DataError(
                f"{archive_member} from {url} has sha256 {digest}, expected {sha256}; it was discarded. "
                f"Put a correct copy at {dest} or pass data.path=/path/to/corpus."
            )
    if size is not None and (actual := dest.stat().st_size) != size:
        dest.unlink()
        raise DataError(
            f"The corpus from {url} has {actual} bytes, expected {size}; it was discarded. "
            f"Put a correct copy at {dest} or pass data.path=/path/to/corpus."
        )


def _extract(archive: Path, member: str, out: Path, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as source, open(out, "wb") as target:
            while block := source.read(1 << 20):
                target.write(block)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DataError(
            f"The download from {url} is not a zip archive holding {member} ({error}); put the corpus at "
            f"{archive.parent / member} yourself or pass data.path=/path/to/corpus."
        ) from None


# --------------------------------------------------------------------------------------------------------------
# Corpus encoding


@dataclass
class EncodedCorpus:
    """A corpus as a memory-mapped array of ids, with the tokenizer that made them."""

    ids: np.ndarray
    tokenizer: CharTokenizer
    sha256: str


def _decoded_chunks(path: Path, errors: str, encoding: str = "utf-8") -> Iterator[tuple[str, bytes]]:
    """Yields (text, raw bytes) chunk by chunk; invalid UTF-8 under errors='strict' names its byte offset."""
    decoder = codecs.getincrementaldecoder(ENCODINGS[encoding])(errors=errors)
    offset = 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                where = offset - pending + error.start
                raise DataError(
                    f"{path} is not valid UTF-8 (byte offset {where}); fix the file or pass "
                    "data.decode_errors=replace to replace undecodable bytes."
                ) from None
            offset += len(raw)
            yield text, raw
            if not raw:
                return


def _scan_vocabulary(path: Path, errors: str, encoding: str) -> tuple[str, str]:
    """One pass over the file: its sorted unique characters and its sha256."""
    digest = hashlib.sha256()
    seen = np.zeros(65536, dtype=bool)
    beyond_bmp: set[int] = set()
    for text, raw in _decoded_chunks(path, errors, encoding):
        digest.update(raw)
        codepoints = text_to_codepoints(text)
        # bincount is linear time; a sort-based unique over hundreds of millions of characters is not
        small = codepoints[codepoints < 65536]
        seen |= np.bincount(small, minlength=65536).astype(bool)
        beyond_bmp.update(np.unique(codepoints[codepoints >= 65536]).tolist())
    codepoints = np.flatnonzero(seen).tolist() + sorted(beyond_bmp)
    return "".join(map(chr, codepoints)), digest.hexdigest()


def cache_dir_for(corpus: Path, fallback: Path) -> Path:
    """The corpus's own folder when it is writable, otherwise `fallback` (read-only data stays untouched)."""
    return corpus.parent if os.access(corpus.parent, os.W_OK) else fallback


def encode_corpus(
    path: str | Path, cache_dir: str | Path | None = None, decode_errors: str = "strict", encoding: str = "utf-8"
) -> EncodedCorpus:
    """Encodes a text file to ids once, caches them, and memory-maps the cache.

    `encoding` is 'utf-8' (characters) or 'bytes' (each byte one symbol, as enwik8 is read in the literature).

    The cache sits beside the corpus (or in `cache_dir` when the corpus folder is read-only). A small JSON
    index records the corpus's size, modification time and sha256, so reopening an unchanged corpus costs
    a stat and a memory map, not a pass over the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"The corpus file {path} does not exist; pass data.path=/path/to/corpus.txt.")
    if path.is_dir():
        raise DataError(f"The corpus path {path} is a directory; pass data.path= a text file inside it.")
    if decode_errors not in ("strict", "replace", "ignore"):
        raise ConfigError(f"data.decode_errors={decode_errors!r} is not one of strict, replace, ignore.")
    if encoding not in ENCODINGS:
        raise ConfigError(f"data.encoding={encoding!r} is not one of {', '.join(ENCODINGS)}.")
    stat = path.stat()
    if stat.st_size == 0:
        raise DataError(f"The corpus file {path} is empty; give it some text.")

    folder = Path(cache_dir_for(path, Path(cache_dir) if cache_dir else path.parent))
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    index_path = folder / f"{path.name}.{key}.lmcache.json"
    index = _read_json(index_path)
    settings = {"format": CACHE_FORMAT, "decode_errors": decode_errors, "encoding": encoding}

    def cache_ok(idx: dict | None) -> bool:
        return bool(idx) and all(idx.get(k) == v for k, v in settings.items()) and (folder / idx["ids_file"]).exists()

    fresh = cache_ok(index) and index["size"] == stat.st_size and index["mtime_ns"] == stat.st_mtime_ns
    if not fresh and cache_ok(index) and index["size"] == stat.st_size and _file_sha256(path) == index["sha256"]:
        # touched but unchanged: record the new time, so the next open skips the hash again
        index = {**index, "mtime_ns": stat.st_mtime_ns}
        write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index, ensure_ascii=False)))
        fresh = True
    if fresh and (problem := _ids_problem(folder / index["ids_file"], index)):
        print(f"The id cache {folder / index['ids_file']} {problem}; rebuilding it from {path}.", file=sys.stderr)
        fresh = False
    if not fresh:
        stale = folder / index["ids_file"] if index and "ids_file" in index else None
        index = _build_cache(path, folder, index_path, decode_errors, encoding, settings)
        if stale is not None and stale.name != index["ids_file"]:
            stale.unlink(missing_ok=True)  # the ids of the corpus's previous contents
    ids = np.memmap(folder / index["ids_file"], dtype=np.dtype(index["dtype"]), mode="r")
    tokenizer = CharTokenizer(index["vocab"], byte_level=encoding == "bytes")
    return EncodedCorpus(ids=ids, tokenizer=tokenizer, sha256=index["sha256"])


def _build_cache(path: Path, folder: Path, index_path: Path, decode_errors: str, encoding: str, settings: dict) -> dict:
    stat = path.stat()
    vocab, sha256 = _scan_vocabulary(path, decode_errors, encoding)
    if not vocab:
        raise DataError(f"The corpus file {path} has no characters after decoding; give it some text.")
    tokenizer = CharTokenizer(vocab)
    ids_name = f"{path.name}.{sha256[:16]}.{tokenizer.dtype.name}"

    n_ids, crc32 = 0, 0

    def write_ids(tmp: Path) -> None:
        nonlocal n_ids, crc32
        with open(tmp, "wb") as out:
            for text, _ in _decoded_chunks(path, decode_errors, encoding):
                ids = tokenizer.encode_codepoints(text_to_codepoints(text))
                n_ids, crc32 = n_ids + len(ids), zlib.crc32(ids, crc32)
                ids.tofile(out)

    write_atomically(folder / ids_name, write_ids)
    index = {
        **settings,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
        "vocab": vocab,
        "dtype": tokenizer.dtype.name,
        "ids_file": ids_name,
        "n_ids": n_ids,
        "crc32": crc32,
    }
    write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index, ensure_ascii=False)))
    return index


def _ids_problem(ids_path: Path, index: dict) -> str | None:
    """What is wrong with an id cache file against its index (length first: a stat), or None when it matches."""
    expected = index["n_ids"] * np.dtype(index["dtype"]).itemsize
    actual = ids_path.stat().st_size
    if actual != expected:
        return f"has {actual} bytes, not the {expected} its index records"
    ids = np.memmap(ids_path, dtype=np.uint8, mode="r")
    crc32 = 0
    for start in range(0, len(ids), CHUNK_BYTES):
        crc32 = zlib.crc32(ids[start : start + CHUNK_BYTES], crc32)
    return None if crc32 == index["crc32"] else "does not match the checksum its index records"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------------------------------------
# Batches


class RandomWindowBatches(IterableDataset):
    """Training batches of random windows, each a whole (x, y) pair of int64 tensors of shape (B, T).

    Batch number i is a pure function of (seed, rank, i), so a run resumed at step s draws exactly the
    batches an uninterrupted run would have drawn; `start_index` tells where the run stands.
    """

    def __init__(
        self,
        ids: np.ndarray,
        batch_size: int,
        seq_length: int,
        num_batches: int,
        seed: int,
        rank: int = 0,
        start_index: Callable[[], int] = lambda: 0,
    ):
        self.ids, self.batch_size, self.seq_length = ids, batch_size, seq_length
        self.num_batches, self.seed, self.rank, self.start_index = num_batches, seed, rank, start_index
        self._window = np.arange(seq_length + 1)

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, self.rank, index))
        offsets = rng.integers(0, len(self.ids) - self.seq_length, size=self.batch_size)
        block = torch.from_numpy(self.ids[offsets[:, None] + self._window].astype(np.int64))
        return block[:, :-1], block[:, 1:]

    def __iter__(self):
        start = self.start_index()
        for index in range(start, start + self.num_batches):
            yield self.batch(index)


class ValidationWindows(IterableDataset):
    """Fixed, non-overlapping windows covering every target of the split exactly once.

    The last window is aligned to the end of the split; targets it shares with the previous window are
    masked with IGNORE_INDEX, so the token-weighted mean loss is exact. Windows are dealt round-robin to
    ranks, so several processes together still count each target once.
    """

    def __init__(self, ids: np.ndarray, batch_size: int, seq_length: int, rank: int = 0, world_size: int = 1):
        self.ids, self.batch_size, self.seq_length = ids, batch_size, seq_length
        n_targets = len(ids) - 1
        starts = list(range(0, n_targets - seq_length + 1, seq_length))
        covered = len(starts) * seq_length
        self.masked_prefix = {}
        if covered < n_targets:
            last = n_targets - seq_length
            self.masked_prefix[last] = covered - last
            starts.append(last)
        self.starts = starts[rank::world_size]

    def __len__(self) -> int:
        return -(-len(self.starts) // self.batch_size)

    def __iter__(self):
        window = np.arange(self.seq_length + 1)
        for i in range(0, len(self.starts), self.batch_size):
            starts = np.array(self.starts[i : i + self.batch_size])
            block = torch.from_numpy(self.ids[starts[:, None] + window].astype(np.int64))
            x, y = block[:, :-1], block[:, 1:].clone()
            for row, start in enumerate(starts.tolist()):
                y[row, : self.masked_prefix.get(start, 0)] = IGNORE_INDEX
            yield x, y


# --------------------------------------------------------------------------------------------------------------
# Lightning data module


def split_bounds(n_ids: int, val_fraction: float, split_sizes: list[int] | None = None) -> dict[str, tuple[int, int]]:
    """Where each split lies in a corpus of `n_ids` characters: {name: (start, end)}.

    With `split_sizes` [train, val, test] (characters, from the start, as the literature splits enwik8 and text8),
    those three; without, a training head and the last `val_fraction` for validation, and no test split.
    """
    if split_sizes is None:
        n_train = n_ids - int(n_ids * val_fraction)
        return {"train": (0, n_train), "val": (n_train, n_ids)}
    n_train, n_val, n_test = split_sizes
    if n_train + n_val + n_test > n_ids:
        raise DataError(
            f"data.split_sizes={list(split_sizes)} asks for {n_train + n_val + n_test} characters, but the corpus "
            f"has {n_ids}; give smaller sizes, or null to split by data.val_fraction."
        )
    return {
        "train": (0, n_train),
        "val": (n_train, n_train + n_val),
        "test": (n_train + n_val, n_train + n_val + n_test),
    }


class CharDataModule(L.LightningDataModule):
    """A character corpus split into a training head and a contiguous validation tail (or, with `split_sizes`,
    training, validation and test splits in that order).

    Args:
        path: the corpus file; None means the named corpus (`name`) in `data_dir`, downloaded once if missing.
        data_dir: where the named corpus lives, and where id caches go when a corpus folder is read-only.
        val_fraction: the share of the corpus (its tail) held out for validation, in (0, 1).
        seq_length: characters of context per training window.
        batch_size: windows per batch (per process).
        seed: drives which windows training draws.
        decode_errors: 'strict' rejects invalid UTF-8; 'replace' or 'ignore' handle it as Python does.
        url, sha256: where the named corpus is downloaded from, and the corpus's checksum.
        name: the named corpus's file name in `data_dir`.
        archive_member: the download is a zip archive holding the corpus under this name.
        size: the corpus's size in bytes, checked after the download.
        encoding: 'utf-8' (characters) or 'bytes' (each byte one symbol).
        split_sizes: [train, val, test] characters from the corpus's start; None splits by `val_fraction`.
        train_fraction: train on this leading share of the training split, in (0, 1] (the data study's knob).
    """

    def __init__(
        self,
        path: str | None = None,
        data_dir: str = "data",
        val_fraction: float = 0.1,
        seq_length: int = 256,
        batch_size: int = 64,
        seed: int = 0,
        decode_errors: str = "strict",
        url: str = TINY_SHAKESPEARE_URL,
        sha256: str | None = TINY_SHAKESPEARE_SHA256,
        name: str = "tinyshakespeare.txt",
        archive_member: str | None = None,
        size: int | None = None,
        encoding: str = "utf-8",
        split_sizes: list[int] | None = None,
        train_fraction: float = 1.0,
    ):
        super().__init__()
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction} must be between 0 and 1 (exclusive), e.g. 0.1.")
        for key, value in (("seq_length", seq_length), ("batch_size", batch_size)):
            if not is_count(value):
                raise ConfigError(f"data.{key}={value} must be a positive integer.")
        if split_sizes is not None:
            split_sizes = list(split_sizes)
            if len(split_sizes) != 3 or not all(is_count(n) for n in split_sizes):
                raise ConfigError(
                    f"data.split_sizes={split_sizes} must be three positive character counts [train, val, test], "
                    "e.g. [90000000,5000000,5000000], or null."
                )
        if not is_number(train_fraction) or not 0 < train_fraction <= 1:
            raise ConfigError(f"data.train_fraction={train_fraction} must be in (0, 1], e.g. 0.25 for a quarter.")
        if encoding not in ENCODINGS:
            raise ConfigError(f"data.encoding={encoding!r} is not one of {', '.join(ENCODINGS)}.")
        self.path, self.data_dir, self.val_fraction = path, Path(data_dir), val_fraction
        self.seq_length, self.batch_size, self.seed = seq_length, batch_size, seed
        self.decode_errors, self.url, self.sha256 = decode_errors, url, sha256
        self.name, self.archive_member, self.size, self.encoding = name, archive_member, size, encoding
        self.split_sizes, self.train_fraction = split_sizes, train_fraction
        self.corpus: EncodedCorpus | None = None

    @property
    def corpus_path(self) -> Path:
        if self.path is not None:
            return Path(self.path).expanduser()
        return self.data_dir / self.name

    def prepare_data(self) -> None:
        """Downloads the named corpus if it is missing and builds the id cache (safe to call repeatedly)."""
        self.load()

    def load(self) -> EncodedCorpus:
        """Opens the corpus (downloading or encoding it first if needed) and checks every split is usable."""
        if self.corpus is None:
            if self.path is None and not self.corpus_path.exists():
                download_corpus(self.url, self.corpus_path, self.sha256, self.size, self.archive_member)
            corpus = encode_corpus(self.corpus_path, self.data_dir / "cache", self.decode_errors, self.encoding)
            bounds = self._bounds(len(corpus.ids))
            names = {"train": "training", "val": "validation", "test": "test"}
            for split, (start, end) in bounds.items():
                if end - start < self.seq_length + 1:
                    raise DataError(
                        f"The {names[split]} split of {self.corpus_path} has {end - start} characters, fewer than "
                        f"data.seq_length + 1 = {self.seq_length + 1}; use a longer corpus, a shorter "
                        "data.seq_length, a larger data.train_fraction, or a different data.val_fraction."
                    )
            self.corpus = corpus
        return self.corpus

    def _bounds(self, n_ids: int) -> dict[str, tuple[int, int]]:
        bounds = split_bounds(n_ids, self.val_fraction, self.split_sizes)
        start, end = bounds["train"]
        bounds["train"] = (start, start + int((end - start) * self.train_fraction))
        return bounds

    @property
    def tokenizer(self) -> CharTokenizer:
        return self.load().tokenizer

    def split(self, name: str) -> np.ndarray:
        """The ids of the 'train' (the part trained on), 'val' or 'test' split (views into the memory map)."""
        ids = self.load().ids
        bounds = self._bounds(len(ids))
        if name not in bounds:
            raise DataError(
                f"{self.corpus_path} has no {name} split (it is split into {' and '.join(bounds)}); "
                "set data.split_sizes=[train,val,test] to hold out a test split."
            )
        start, end = bounds[name]
        return ids[start:end]

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        train = self.split("train")
        # An "epoch" is one pass's worth of tokens across all processes.
        num_batches = max(1, len(train) // (self.batch_size * self.seq_length * world_size))
        trainer = self.trainer

        def start_index() -> int:
            if trainer is None:
                return 0
            return trainer.global_step * trainer.accumulate_grad_batches

        dataset = RandomWindowBatches(
            train, self.batch_size, self.seq_length, num_batches, self.seed, rank, start_index
        )
        return DataLoader(dataset, batch_size=None, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        dataset = ValidationWindows(self.split("val"), self.batch_size, self.seq_length, rank, world_size)
        # own generators: a DataLoader iterator otherwise draws its seed from the global RNG, and resuming would
        # shift dropout's random stream
        return DataLoader(dataset, batch_size=None, generator=torch.Generator())
