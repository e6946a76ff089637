"""Batches of the character corpus and the Lightning data module.

Training batches are drawn as whole arrays: random window offsets and one vectorised gather. Validation reads
the split in order, every target once (`ValidationWindows`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from lm.corpus import (
    ENCODINGS,
    NEWLINES,
    TINY_SHAKESPEARE_SHA256,
    TINY_SHAKESPEARE_URL,
    EncodedCorpus,
    download_corpus,
    encode_corpus,
    plural,
)
from lm.errors import ConfigError, DataError, is_count, is_number
from lm.loss import IGNORE_INDEX
from lm.tokenizer import CharTokenizer

# --------------------------------------------------------------------------------------------------------------
# Batches


class BatchShapeSchedule:
    """The shape (windows, length) of training step `step`'s batch: small batches and short windows first, growing
    to (`batch_size`, `seq_length`) over their warmup steps; off (None starts), every step is the full shape.

    - Batch-size warmup: `batch_size_start` windows at step 0, growing linearly to `batch_size` at
      `batch_size_warmup_steps` (fewer characters per step early, when the gradient's direction needs few).
    - Sequence-length warmup (short sequences first): windows of `seq_length_start` characters, doubling at equal
      shares of `seq_length_warmup_steps` up to `seq_length`. A step of windows 1/k as long takes k times as many,
      so every step trains on the same characters, but attention, which grows with the window, costs less.
    """

    def __init__(
        self,
        batch_size: int,
        seq_length: int,
        batch_size_start: int | None = None,
        batch_size_warmup_steps: int = 0,
        seq_length_start: int | None = None,
        seq_length_warmup_steps: int = 0,
    ):
        for key, value in (
            ("batch_size_warmup_steps", batch_size_warmup_steps),
            ("seq_length_warmup_steps", seq_length_warmup_steps),
        ):
            if not is_count(value, minimum=0):
                raise ConfigError(f"data.{key}={value} must be a whole number of steps, 0 or more.")
        if batch_size_start is not None and not (is_count(batch_size_start) and batch_size_start <= batch_size):
            raise ConfigError(
                f"data.batch_size_start={batch_size_start} must be a whole number of windows from 1 to "
                f"data.batch_size={batch_size}, or null (no batch-size warmup)."
            )
        if seq_length_start is not None and not (
            is_count(seq_length_start)
            and seq_length % seq_length_start == 0
            and (seq_length // seq_length_start).bit_count() == 1
        ):
            raise ConfigError(
                f"data.seq_length_start={seq_length_start} must be data.seq_length={seq_length} halved some number "
                f"of times (e.g. {max(1, seq_length // 4)}), since the windows double up to it; or null."
            )
        self.batch_size, self.seq_length = batch_size, seq_length
        self.batch_size_start, self.batch_size_warmup_steps = batch_size_start, batch_size_warmup_steps
        self.seq_length_start, self.seq_length_warmup_steps = seq_length_start, seq_length_warmup_steps

    def batch_size_at(self, step: int) -> int:
        start, steps = self.batch_size_start, self.batch_size_warmup_steps
        if start is None or step >= steps:
            return self.batch_size
        return start + (self.batch_size - start) * step // steps

    def seq_length_at(self, step: int) -> int:
        start, steps = self.seq_length_start, self.seq_length_warmup_steps
        if start is None or step >= steps:
            return self.seq_length
        stages = (self.seq_length // start).bit_length()  # start, 2 x start, ..., seq_length
        return start << (step * stages // steps)

    def shape(self, step: int) -> tuple[int, int]:
        """(windows, characters per window) of step `step` (0-based optimizer steps)."""
        length = self.seq_length_at(step)
        return self.batch_size_at(step) * (self.seq_length // length), length


class RandomWindowBatches(IterableDataset):
    """Training batches of random windows, each a whole (x, y) pair of int64 tensors of shape (B, T).

    Batch number i is a pure function of (seed, rank, i), so a run resumed at step s draws exactly the
    batches an uninterrupted run would have drawn; `start_index` tells where the run stands. With a `schedule`,
    batch i has the shape of optimizer step i // `accumulate` (`BatchShapeSchedule`).
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
        schedule: BatchShapeSchedule | None = None,
        accumulate: int = 1,
    ):
        self.ids, self.batch_size, self.seq_length = ids, batch_size, seq_length
        self.num_batches, self.seed, self.rank, self.start_index = num_batches, seed, rank, start_index
        self.schedule, self.accumulate = schedule, accumulate

    def __len__(self) -> int:
        return self.num_batches

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, length = (self.batch_size, self.seq_length)
        if self.schedule is not None:
            rows, length = self.schedule.shape(index // self.accumulate)
        rng = np.random.default_rng((self.seed, self.rank, index))
        offsets = rng.integers(0, len(self.ids) - length, size=rows)
        block = torch.from_numpy(self.ids[offsets[:, None] + np.arange(length + 1)].astype(np.int64))
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
        newlines: 'normalize' reads Windows line ends (\r\n) as \n; 'keep' keeps \r as a character.
        batch_size_start, batch_size_warmup_steps, seq_length_start, seq_length_warmup_steps: small batches and
            short windows first (`BatchShapeSchedule`); None starts: every training batch has the full shape.
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
        newlines: str = "normalize",
        batch_size_start: int | None = None,
        batch_size_warmup_steps: int = 0,
        seq_length_start: int | None = None,
        seq_length_warmup_steps: int = 0,
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
        if newlines not in NEWLINES:
            raise ConfigError(f"data.newlines={newlines!r} is not one of {', '.join(NEWLINES)}.")
        self.path, self.data_dir, self.val_fraction = path, Path(data_dir), val_fraction
        self.seq_length, self.batch_size, self.seed = seq_length, batch_size, seed
        self.decode_errors, self.url, self.sha256 = decode_errors, url, sha256
        self.name, self.archive_member, self.size, self.encoding = name, archive_member, size, encoding
        self.split_sizes, self.train_fraction, self.newlines = split_sizes, train_fraction, newlines
        self.corpus: EncodedCorpus | None = None
        self.schedule = BatchShapeSchedule(
            batch_size, seq_length, batch_size_start, batch_size_warmup_steps, seq_length_start, seq_length_warmup_steps
        )

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
            if self.corpus_path.is_file():  # its size in bytes bounds its characters: refuse before caching ids
                self._check_splits(self.corpus_path.stat().st_size, "at most ")
            corpus = encode_corpus(
                self.corpus_path, self.data_dir / "cache", self.decode_errors, self.encoding, self.newlines
            )
            self._check_splits(len(corpus.ids))
            self.corpus = corpus
        return self.corpus

    def _check_splits(self, n_ids: int, bound: str = "") -> None:
        """Every split of a corpus of `n_ids` characters must hold one training window (`bound`: 'at most ' when
        `n_ids` is an upper bound)."""
        names = {"train": "training", "val": "validation", "test": "test"}
        for split, (start, end) in self._bounds(n_ids).items():
            if end - start < self.seq_length + 1:
                raise DataError(
                    f"The {names[split]} split of {self.corpus_path} has {bound}{plural(end - start, 'character')}, "
                    f"fewer than data.seq_length + 1 = {self.seq_length + 1}; use a longer corpus, a shorter "
                    "data.seq_length, a larger data.train_fraction, or a different data.val_fraction."
                )

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
            train,
            self.batch_size,
            self.seq_length,
            num_batches,
            self.seed,
            rank,
            start_index,
            self.schedule,
            trainer.accumulate_grad_batches if trainer is not None else 1,
        )
        return DataLoader(dataset, batch_size=None, generator=torch.Generator())

    def val_dataloader(self) -> DataLoader:
        rank, world_size = self._rank()
        dataset = ValidationWindows(self.split("val"), self.batch_size, self.seq_length, rank, world_size)
        # own generators: a DataLoader iterator otherwise draws its seed from the global RNG, and resuming would
        # shift dropout's random stream
        return DataLoader(dataset, batch_size=None, generator=torch.Generator())
