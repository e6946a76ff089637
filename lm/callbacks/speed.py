"""Speed: tokens per second and model FLOPs utilisation (MFU), and how long compiling the model took."""

from __future__ import annotations

import sys
import time

import lightning as L
import torch
from lightning.fabric.utilities.throughput import Throughput
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities import rank_zero_only

from lm.hardware import measure_matmul_peak


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
        if metrics:  # at the number of optimizer steps taken, as every other series (lm.module)
            step = trainer.global_step if trainer.state.stage == RunningStage.TRAINING else iter_num
            trainer._logger_connector.log_metrics(metrics, step=step)

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
