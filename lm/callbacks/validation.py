"""Validation callbacks: a full validation pass at the end of every run, what validations cost, and their results
in train.log."""

from __future__ import annotations

import sys
import time

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn

from lm.run_log import log_only


class ValidateAtEnd(L.Callback):
    """Makes the last training step of every run, however short, end with a full validation pass.

    Lightning validates every `val_check_interval` steps only, so a run whose length is not a multiple of it
    (or shorter) would end without final `val/*` metrics. Asking the trainer to stop on the last step makes
    Lightning validate before it stops.
    """

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True
        last_epoch = (
            trainer.max_epochs is not None
            and trainer.max_epochs > 0
            and (trainer.current_epoch + 1 >= trainer.max_epochs)
        )
        if last_epoch and batch_idx + 1 >= trainer.num_training_batches:
            trainer.should_stop = True


class ValidationCost(L.Callback):
    """Times every validation of a fit, with what follows it before training goes on (the text sample and the
    checkpoint calls of the callbacks after this one), and keeps when each ended and its val/loss: the run's
    summary.json gets them (`validations`, `validation_seconds`), and the end of training says their share.

    A validation's cost runs from its start to the next training step (or the end of training); the part after the
    validation loop (`after_s`) is what the other callbacks did with it, as long as this one is listed first. Its
    `fit_seconds` is when it ended on the run's training clock (`LanguageModel.fit_seconds`: every session, no
    pause); checkpoints keep the records, so a resumed run's summary lists its earlier sessions' validations too.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []
        self._started: float | None = None
        self._loop_ended: float | None = None

    @property
    def seconds(self) -> float:
        """All validations' cost so far, what follows them included."""
        return sum(r["seconds"] for r in self.records)

    def state_dict(self) -> dict:
        return {"records": [dict(r) for r in self.records]}

    def load_state_dict(self, state_dict: dict) -> None:
        self.records = [dict(r) for r in state_dict.get("records", [])]

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._started is None:
            return
        self._loop_ended = time.perf_counter()
        loss = trainer.callback_metrics.get("val/loss")
        loop = self._loop_ended - self._started
        # as of the loop's end, until `_close` adds what followed: a checkpoint saved in between keeps these
        self.records.append(
            {
                "step": trainer.global_step,
                "val_loss": None if loss is None else float(loss),
                "loop_s": loop,
                "seconds": loop,
                "fit_seconds": pl_module.fit_seconds,
            }
        )

    def _close(self, pl_module) -> None:
        if self._started is None or self._loop_ended is None:
            return
        now = time.perf_counter()
        record = self.records[-1]
        record["after_s"] = now - self._loop_ended
        record["seconds"] = now - self._started
        record["fit_seconds"] = pl_module.fit_seconds  # when it ended, on the run's training clock
        record["time"] = time.time()  # the same moment as a Unix time, to compare with other processes' clocks
        self._started = self._loop_ended = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        self._close(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._close(pl_module)
        if trainer.is_global_zero and self.records:
            fit = pl_module.fit_seconds
            after = sum(r.get("after_s", 0.0) for r in self.records)
            print(
                f"[transformer-lm] validation: {len(self.records)} passes took {self.seconds:.1f} s, "
                f"{self.seconds / fit:.1%} of the {fit:.1f} s that training took ({after:.1f} s of it text samples "
                "and checkpoint calls)",
                file=sys.stderr,
            )


class ValidationLog(L.Callback):
    """Writes each validation's results to the run's train.log (`lm.run_log`): the console shows them only inside
    the progress bar, whose redraws the log leaves out."""

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        if metrics:
            values = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            log_only(f"[transformer-lm] validation at step {trainer.global_step}: {values}")
