"""Checkpoints: the latest step's `last.ckpt` after every validation, and one on SIGINT/SIGTERM before the run
stops."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from lm.errors import LMError


class LatestCheckpoint(Checkpoint):
    """Keeps `<dirpath>/last.ckpt` at the latest step: written after every validation and when training ends.

    `resume=` continues from this file, so it must never lag behind. Lightning's `ModelCheckpoint(save_last=True)`
    does not do this: it writes last.ckpt only together with a new top-k checkpoint, so with `save_top_k=1` it
    stays at the best step once val/loss stops improving. Being a `Checkpoint`, this runs after
    the ModelCheckpoint listed before it, so the best score saved with the step is already up to date.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._saved_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        # rank 0's directory on every process: the others may have been started with a private one (lm.cli)
        self.path = Path(trainer.strategy.broadcast(str(self.path)))

    def save(self, trainer: L.Trainer) -> None:
        """Writes the checkpoint now (on every rank's call; only rank 0 writes), unless this step is saved already."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING or trainer.global_step == self._saved_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)
        self._saved_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self.save(trainer)  # a run without validation batches still ends with its last step saved


class InterruptedTraining(LMError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; `exit_code` is 128 + the signal number.
    `quiet` on every process but rank 0, which alone says so."""

    def __init__(self, message: str, signum: int, step: int, checkpoint: Path, quiet: bool = False):
        super().__init__(message)
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        self.quiet = quiet


class SaveOnInterrupt(L.Callback):
    """On Ctrl-C (SIGINT) or SIGTERM, finishes the current step, saves `last.ckpt` there and stops.

    With several processes (DDP), the processes agree after every step on whether any of them got a signal, so all
    stop at the same step, rank 0 writes the checkpoint once, and none waits on a collective the others left. The
    checkpoint is written atomically (temporary file, then rename), so a process killed while saving never leaves a
    broken `last.ckpt`. A second signal ends the process at once, without saving, even while it waits inside a
    collective (where Python's own handlers cannot run): a watcher thread reads the signal's wake-up byte.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}
        self._wakeup: tuple[int, int] | None = None  # the pipe the C-level handler writes each signal's number to

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be installed from the main thread
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        read_end, write_end = os.pipe()
        os.set_blocking(write_end, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
        self._wakeup = (read_end, write_end)
        threading.Thread(target=self._exit_on_second_signal, args=(read_end,), daemon=True).start()

    def _exit_on_second_signal(self, read_end: int) -> None:
        seen = 0
        while True:
            try:
                data = os.read(read_end, 64)
            except OSError:
                return  # the pipe was closed: training is over
            if not data:
                return
            for signum in data:
                if signum in self.SIGNALS:
                    seen += 1
                    if seen >= 2:
                        print(f"\n{signal.Signals(signum).name} received again: stopped at once.", file=sys.stderr)
                        os._exit(128 + signum)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            for fd in self._wakeup:
                os.close(fd)
            self._wakeup = None

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def agreed_signal(self, trainer: L.Trainer) -> int:
        """The signal any process received (0: none), the same on every process: one all-reduce a step with DDP."""
        signum = self.received or 0
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([signum], device=trainer.strategy.root_device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        signum = self.agreed_signal(trainer)
        if not signum:
            return
        latest = next((c for c in trainer.callbacks if isinstance(c, LatestCheckpoint)), None)
        path = latest.path if latest else Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        folder = path.parent
        trainer.save_checkpoint(path, weights_only=False)  # atomic, and only rank 0 writes
        name = signal.Signals(signum).name
        raise InterruptedTraining(
            f"{name} received: saved {path} at step {trainer.global_step}; continue with "
            f"resume={folder.parent} (or ckpt_path={path}).",
            signum,
            trainer.global_step,
            path,
            quiet=not trainer.is_global_zero,
        )
