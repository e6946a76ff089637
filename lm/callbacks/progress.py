"""The progress bar."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class ResumableProgressBar(TQDMProgressBar):
    """tqdm's bar, which also knows its epoch, total and rate when a run resumes in the middle of an epoch.

    Lightning does not call `on_train_epoch_start` for an epoch it resumes, so the bar would read "Training: n/?"
    with no total and no time left, and count the batches before the checkpoint as if done in the first second.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        done = trainer.fit_loop.epoch_loop.batch_progress.current.completed  # batches of this epoch done before
        if not done:
            return  # a fresh epoch: on_train_epoch_start sets the bar up
        self.on_train_epoch_start(trainer, pl_module)
        bar = self.train_progress_bar
        # Lightning's total counts from here (the epoch's batches, or fewer steps left); the bar counts from the
        # epoch's start
        if bar.total is not None:  # None: an epoch of unknown length
            bar.total = min(trainer.num_training_batches, done + bar.total)
        bar.initial = bar.n = done  # the rate and time left count only the batches run in this process
        bar.refresh()
