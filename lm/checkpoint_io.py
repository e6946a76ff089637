"""Checkpoint writers: atomic (a temporary file renamed into place) and in the background (Lightning's
`AsyncCheckpointIO` around the atomic one), and the one-sentence error for a checkpoint that cannot be written."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection

from lm.errors import LMError
from lm.files import write_atomically


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in its own folder, then renames it into place.

    Lightning's own writer stages the file in the system temp folder and moves it, which is a copy (not atomic)
    when that folder is on another file system; a rename within one folder is atomic, so a process killed while
    saving leaves the previous checkpoint whole.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)

        def save(tmp: Path) -> None:
            # through a Python file, so that a failed write keeps its OSError (torch's own file writer reports
            # a full disk as "RuntimeError: unexpected pos")
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)

        try:
            write_atomically(path, save)
        except (OSError, RuntimeError) as error:  # a full disk, a quota, a folder gone: the run cannot keep its state
            cause = error if isinstance(error, OSError) else error.__context__
            if not isinstance(cause, OSError):
                raise
            raise CheckpointWriteError(path, checkpoint, cause) from error


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Lightning's `AsyncCheckpointIO` around `AtomicCheckpointIO`: the checkpoint's tensors are copied at once (a
    point-in-time state, so exact resume holds) and written to disk by one thread, in order, while training goes on.

    After a write fails (a full disk), no later one is written, so the last intact checkpoint stays the newest; the
    error ends the run at the next save, or when training ends (teardown waits for every write).
    """

    def __init__(self, checkpoint_io: TorchCheckpointIO | None = None):
        super().__init__(checkpoint_io or AtomicCheckpointIO())

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if self._error:
            raise self._error
        self._ensure_setup()
        snapshot = apply_to_collection(checkpoint, torch.Tensor, lambda t: t.detach().clone())

        def write() -> None:
            if self._error is None:
                try:
                    self.checkpoint_io.save_checkpoint(snapshot, path, storage_options)
                except BaseException as error:
                    self._error = error

        self._executor.submit(write)

    def wait(self) -> None:
        """Returns once every write asked for so far is done; raises the error of one that failed."""
        if self._executor is not None:
            self._executor.submit(lambda: None).result()  # one worker, first in first out: after all before it
        if self._error:
            raise self._error


def tensor_bytes(obj) -> int:
    """The bytes of all tensors in a (nested) checkpoint: about the size its file needs."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def size(n_bytes: float) -> str:
    """A size for people: 512 KiB, 3.9 MiB, 1.2 GiB."""
    for unit in ("KiB", "MiB"):
        n_bytes /= 1024
        if n_bytes < 1024:
            return f"{n_bytes:.0f} {unit}" if unit == "KiB" else f"{n_bytes:.1f} {unit}"
    return f"{n_bytes / 1024:.1f} GiB"


class CheckpointWriteError(LMError):
    """A checkpoint could not be written (full disk, or any other OSError); the file at that path, if any, and the
    other checkpoints in its folder are untouched, and no partial file is left."""

    def __init__(self, path: Path, checkpoint: dict, error: OSError):
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        intact = sorted(
            (p for p in path.parent.glob("*.ckpt") if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True
        )
        if intact:
            last, then = f"the last intact checkpoint is {intact[0]}", f"continue with resume={path.parent.parent}"
        else:
            last, then = "no checkpoint of this run was written", "run it again"
        super().__init__(
            f"Could not write {path} ({error.strerror or error}): it needs about {size(tensor_bytes(checkpoint))} "
            f"and {size(free)} are free there; {last}. Free "
            f"some space (or set paths.output_dir to a larger disk), then {then}."
        )
