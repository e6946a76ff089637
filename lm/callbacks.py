"""Training callbacks: a final validation pass, the latest checkpoint, the compile time, a resumable progress bar,
throughput/MFU logging, what validation costs, a text sample at the end, a checkpoint on SIGINT/SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import Checkpoint, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from lm.errors import LMError
from lm.generate import generate
from lm.hardware import measure_matmul_peak
from lm.tokenizer import CharTokenizer


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


class LatestCheckpoint(Checkpoint):
    """Keeps `<dirpath>/last.ckpt` at the latest step: written after every validation and when training ends.

    `resume=` continues from this file, so it must never lag behind. Lightning's `ModelCheckpoint(save_last=True)`
    no longer does this (since 2.6 it writes last.ckpt only together with a new top-k checkpoint, so with
    `save_top_k=1` it stays at the best step once val/loss stops improving). Being a `Checkpoint`, this runs after
    the ModelCheckpoint listed before it, so the best score saved with the step is already up to date.
    """

    def __init__(self, dirpath: str | Path, filename: str = "last"):
        self.path = Path(dirpath) / f"{filename}.ckpt"
        self._saved_step: int | None = None

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


class CompileTime(L.Callback):
    """Says how long the first training step took, where `torch.compile` compiles the model (lazily, on that step)."""

    def __init__(self) -> None:
        self._started: float | None = None
        self._said = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        if self._started is None:
            self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._said or self._started is None:
            return
        self._said = True
        if trainer.is_global_zero:
            seconds = time.perf_counter() - self._started
            print(f"[transformer-lm] compiled the model: the first step took {seconds:.1f} s", file=sys.stderr)


class ValidationCost(L.Callback):
    """Times every validation of a fit, with what follows it before training goes on (the text sample and the
    checkpoint calls of the callbacks after this one), and keeps when each ended and its val/loss: the run's
    summary.json gets them (`validations`, `validation_seconds`), and the end of training says their share.

    A validation's cost runs from its start to the next training step (or the end of training); the part after the
    validation loop (`after_s`) is what the other callbacks did with it, as long as this one is listed first.
    """

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.fit_started = time.perf_counter()
        self._started: float | None = None
        self._loop_ended: float | None = None

    @property
    def seconds(self) -> float:
        """All validations' cost so far, what follows them included."""
        return sum(r["seconds"] for r in self.records)

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.fit_started = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == TrainerFn.FITTING:
            self._started = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self._started is None:
            return
        self._loop_ended = time.perf_counter()
        loss = trainer.callback_metrics.get("val/loss")
        self.records.append(
            {
                "step": trainer.global_step,
                "val_loss": None if loss is None else float(loss),
                "loop_s": self._loop_ended - self._started,
            }
        )

    def _close(self) -> None:
        if self._started is None or self._loop_ended is None:
            return
        now = time.perf_counter()
        record = self.records[-1]
        record["after_s"] = now - self._loop_ended
        record["seconds"] = now - self._started
        record["fit_seconds"] = now - self.fit_started  # when it ended, from the start of training
        record["time"] = time.time()  # the same moment as a Unix time, to compare with other processes' clocks
        self._started = self._loop_ended = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        self._close()

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._close()
        if trainer.is_global_zero and self.records:
            fit = time.perf_counter() - self.fit_started
            after = sum(r.get("after_s", 0.0) for r in self.records)
            print(
                f"[transformer-lm] validation: {len(self.records)} passes took {self.seconds:.1f} s, "
                f"{self.seconds / fit:.1%} of the {fit:.1f} s that training took ({after:.1f} s of it text samples "
                "and checkpoint calls)",
                file=sys.stderr,
            )


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


class LMThroughputMonitor(ThroughputMonitor):
    """Lightning's ThroughputMonitor for (x, y) token batches: logs tokens/s, and MFU against `peak_flops`.

    `peak_flops='auto'` measures the matrix-multiply peak of the training dtype on this machine at start
    (Lightning only knows the peaks of some GPUs); a number is used as given; None logs no MFU.
    """

    def __init__(self, peak_flops: float | str | None = "auto", window_size: int = 20):
        super().__init__(
            batch_size_fn=lambda batch: batch[0].shape[0],
            length_fn=lambda batch: batch[0].numel(),
            window_size=window_size,
        )
        self.peak_flops = peak_flops

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        peak = self.peak_flops
        if peak == "auto":
            device = trainer.strategy.root_device
            dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
            peak = self.available_flops or measure_matmul_peak(dtype, str(device))
        if peak is not None:
            self.available_flops = float(peak)
            for stage_key in self._throughputs:
                self._throughputs[stage_key] = Throughput(
                    available_flops=self.available_flops, world_size=trainer.world_size, **self.kwargs
                )

    def _compute(self, trainer: L.Trainer, iter_num: int | None = None) -> None:
        # Lightning logs eleven series here (time, batches, samples, lengths, per-second rates...); two say
        # something a reader plots: tokens/s (all processes together) and MFU
        if not trainer._logger_connector.should_update_logs:
            return
        computed = self._throughputs[trainer.state.stage].compute()
        metrics = {}
        if (tokens := computed.get("items_per_sec", computed.get("device/items_per_sec"))) is not None:
            metrics["speed/tokens_per_sec"] = tokens
        if (mfu := computed.get("device/mfu")) is not None:
            metrics["speed/mfu"] = mfu
        if metrics:
            trainer._logger_connector.log_metrics(metrics, step=iter_num)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.is_global_zero:
            # tokens/s (over the last window_size steps) on the progress bar too
            items_per_sec = self._throughputs[RunningStage.TRAINING].compute().get("device/items_per_sec")
            if items_per_sec is not None:
                pl_module.log("tok/s", items_per_sec, prog_bar=True, logger=False, rank_zero_only=True)

    @rank_zero_only
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, *args, **kwargs) -> None:
        # Validation is still timed (so it is not counted as training time) but not logged: Lightning would log
        # it against its own batch counter, which does not line up with training steps.
        if not trainer.sanity_checking:
            self._update(trainer, pl_module, batch, trainer._evaluation_loop.batch_progress.total.ready)


class TextSample(L.Callback):
    """Logs a short text sample after validations (TensorBoard's Text tab, or the logger's own way), and prints the
    last one at the end of training (also written to `sample.txt`). Sampling uses its own seeded random stream, so
    it never changes the training run.

    `max_time_share` keeps sampling cheap where steps are fast (a GPU): after the first, a validation samples only
    if all samples so far plus one more (as long as the last took) stay within that share of the training time;
    the end of training always samples. None: a sample after every validation.

    With no `prompt`, the sample starts from the first character of the validation split, which is in the
    vocabulary of any corpus. Training is over by then: a failure while sampling (a prompt character the corpus
    never had, say) is reported as a warning and never fails the run.
    """

    def __init__(
        self,
        max_new_tokens: int = 300,
        prompt: str | None = None,
        temperature: float = 0.8,
        top_k: int | None = None,
        seed: int = 0,
        output_dir: str | None = None,
        max_time_share: float | None = 0.02,
    ):
        self.max_new_tokens, self.prompt, self.temperature, self.top_k, self.seed = (
            max_new_tokens,
            prompt,
            temperature,
            top_k,
            seed,
        )
        self.output_dir = output_dir
        self.max_time_share = max_time_share
        self.sampling_seconds, self.last_cost = 0.0, 0.0
        self.fit_started = time.perf_counter()
        self.last: tuple[int | None, str | None] = (None, None)  # (step, text) of the latest sample
        self.failures: set[str] = set()  # reasons already reported: a failure that repeats is said once

    @staticmethod
    def tokenizer(trainer: L.Trainer, pl_module) -> CharTokenizer:
        """The corpus's tokenizer where there is one (it knows a byte corpus's symbols are bytes), else the model's."""
        return getattr(getattr(trainer, "datamodule", None), "tokenizer", None) or pl_module.tokenizer

    def start_text(self, trainer: L.Trainer, pl_module) -> str:
        if self.prompt:
            return self.tokenizer(trainer, pl_module).to_symbols(self.prompt)
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "split"):
            return pl_module.tokenizer.decode(datamodule.split("val")[:1])
        return pl_module.tokenizer.vocab[0]

    def sample(self, trainer: L.Trainer, pl_module) -> str | None:
        """A sample from the model as it is now, or None (with a warning, once per reason) if sampling fails."""
        started = time.perf_counter()
        try:
            return self._sample(trainer, pl_module)
        finally:
            self.last_cost = time.perf_counter() - started
            self.sampling_seconds += self.last_cost

    def affordable(self) -> bool:
        """Whether one more sample keeps sampling within `max_time_share` of the time since training started."""
        if self.max_time_share is None or self.last_cost == 0.0:
            return True
        elapsed = time.perf_counter() - self.fit_started
        return self.sampling_seconds + self.last_cost <= self.max_time_share * elapsed

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        self.fit_started = time.perf_counter()

    def _sample(self, trainer: L.Trainer, pl_module) -> str | None:
        try:
            # a compiled model (model.compile=true) would recompile for every generation length: run it eagerly
            with torch.compiler.set_stance("force_eager"):
                symbols = generate(
                    pl_module.model,
                    pl_module.tokenizer,
                    self.start_text(trainer, pl_module),
                    self.max_new_tokens,
                    temperature=self.temperature,
                    top_k=self.top_k,
                    seed=self.seed,
                )[0]
            return self.tokenizer(trainer, pl_module).to_text(symbols)  # a byte corpus's sample read as UTF-8
        except Exception as error:  # a sample is a courtesy: warn, never fail the run
            message = str(error).splitlines()[0] if str(error) else type(error).__name__
            if message not in self.failures:
                self.failures.add(message)
                print(f"warning: no text sample ({message}); training goes on.", file=sys.stderr)
            return None

    def log_sample(self, trainer: L.Trainer, text: str) -> None:
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_text"):
                experiment.add_text("sample", "```\n" + text + "\n```", trainer.global_step)
            elif hasattr(logger, "log_text"):
                logger.log_text("sample", columns=["text"], data=[[text]], step=trainer.global_step)

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.max_new_tokens <= 0 or trainer.sanity_checking or trainer.state.fn != "fit" or not self.affordable():
            return
        text = self.sample(trainer, pl_module)
        if text is not None:
            self.log_sample(trainer, text)
        self.last = (trainer.global_step, text)

    @rank_zero_only
    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        if self.max_new_tokens <= 0:
            return
        step, text = self.last
        if step != trainer.global_step:  # the run ends with a validation, so this is rare (e.g. no validation)
            text = self.sample(trainer, pl_module)
            if text is not None:
                self.log_sample(trainer, text)
        if text is None:
            return
        print(f"\n----- sample after {trainer.global_step} steps -----\n{text}\n" + "-" * 40, file=sys.stderr)
        if self.output_dir:
            (Path(self.output_dir) / "sample.txt").write_text(text)


class InterruptedTraining(LMError):
    """Training stopped on SIGINT/SIGTERM after saving a checkpoint; `exit_code` is 128 + the signal number.
    `quiet` on every process but rank 0, which alone says so."""

    def __init__(self, message: str, signum: int, quiet: bool = False):
        super().__init__(message)
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
            quiet=not trainer.is_global_zero,
        )
