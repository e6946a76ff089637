"""The LightningModule: loss, metrics, optimizer groups and the learning-rate schedule around a `Transformer`."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.throughput import measure_flops
from lightning.pytorch.callbacks import Timer
from torchmetrics import MeanMetric

from lm.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY
from lm.errors import ConfigError, TrainingDivergedError, is_count, is_number
from lm.loss import IGNORE_INDEX, summed_loss
from lm.model import Transformer, TransformerConfig
from lm.optim import parameter_groups
from lm.tokenizer import CharTokenizer

OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]


SCHEDULE_CLOCKS = ("steps", "time")
SCHEDULE_SHAPES = ("cosine", "wsd")


def warmup_cosine(
    step: int,
    warmup_steps: int,
    decay_progress: float,
    min_lr_ratio: float,
    shape: str = "cosine",
    cooldown: float = 0.2,
) -> float:
    """Learning-rate multiplier: linear warmup to 1 over `warmup_steps`, then, as `decay_progress` goes from 0 to 1
    (held at the end past 1), down to `min_lr_ratio`: along a cosine (`shape="cosine"`), or warmup-stable-decay
    (`"wsd"`: held at 1, then a linear cooldown over the last `cooldown` share; Hu et al. 2024, MiniCPM)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, max(0.0, decay_progress))
    if shape == "wsd":
        into_cooldown = (progress - (1.0 - cooldown)) / cooldown if cooldown > 0 else float(progress >= 1.0)
        return 1.0 - (1.0 - min_lr_ratio) * min(1.0, max(0.0, into_cooldown))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def cosine_schedule(
    step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float, shape: str = "cosine", cooldown: float = 0.2
) -> float:
    """`warmup_cosine` on the step clock: the decay ends at `total_steps`."""
    progress = (step - warmup_steps) / (total_steps - warmup_steps) if total_steps > warmup_steps else 0.0
    return warmup_cosine(step, warmup_steps, progress, min_lr_ratio, shape, cooldown)


class LanguageModel(L.LightningModule):
    """Trains a `Transformer` on next-character prediction.

    Logs `train/loss`, `train/lr` and `train/grad_norm`, and over the whole validation split `val/loss`
    (token-weighted mean cross-entropy, in nats), `val/ppl` (its exponential), `val/bpc` (bits per character,
    loss / ln 2) and `val/best_loss` (the lowest `val/loss` so far).

    Args:
        config: the model's shape.
        vocab: the tokenizer's vocabulary, stored in every checkpoint so decoding needs no corpus.
        optimizer: builds the optimizer from parameter groups (e.g. a partial of torch.optim.AdamW); its
            weight decay applies to weight matrices only.
        warmup_steps, min_lr_ratio, shape, cooldown: the learning-rate schedule (see `warmup_cosine`).
        total_steps: where the cosine decay ends; None means the run's own length (max_steps or epochs).
        clock: 'steps' (the decay follows the step count: repeatable step for step) or 'time' (it follows the
            trainer's time budget, `max_time`: after the warmup steps, progress is the share of the budget left
            at the end of warmup that has been used, so the decay ends on time on a fast or a slow machine).
    """

    def __init__(
        self,
        config: TransformerConfig,
        vocab: str,
        optimizer: OptimizerFactory,
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        total_steps: int | None = None,
        clock: str = "steps",
        shape: str = "cosine",
        cooldown: float = 0.2,
    ):
        super().__init__()
        if clock not in SCHEDULE_CLOCKS:
            raise ConfigError(f"lr_schedule.clock={clock!r} is not one of {', '.join(SCHEDULE_CLOCKS)}.")
        if shape not in SCHEDULE_SHAPES:
            raise ConfigError(f"lr_schedule.shape={shape!r} is not one of {', '.join(SCHEDULE_SHAPES)}.")
        if not is_number(cooldown) or not 0 <= cooldown <= 1:
            raise ConfigError(f"lr_schedule.cooldown={cooldown} must be between 0 and 1 (a share of the decay).")
        if not is_count(warmup_steps, minimum=0):
            raise ConfigError(f"lr_schedule.warmup_steps={warmup_steps} must be a whole number of steps, 0 or more.")
        if not is_number(min_lr_ratio) or not 0 <= min_lr_ratio <= 1:
            raise ConfigError(f"lr_schedule.min_lr_ratio={min_lr_ratio} must be between 0 and 1 (a share of the lr).")
        if total_steps is not None and not is_count(total_steps):
            raise ConfigError(f"lr_schedule.total_steps={total_steps} must be a positive number of steps, or null.")
        self.config = config
        self.tokenizer = CharTokenizer(vocab)
        self.model = Transformer(config)
        # The model's buffers are position tables derived from its config, which grow on the one rank that samples
        # text past the context: DDP must not broadcast them (sizes would differ across ranks). DDP skips these names.
        self._ddp_params_and_buffers_to_ignore = [name for name, _ in self.named_buffers()]
        self.optimizer_factory = optimizer
        self.warmup_steps, self.min_lr_ratio, self.total_steps = warmup_steps, min_lr_ratio, total_steps
        self.clock, self.shape, self.cooldown = clock, shape, cooldown
        self.warmup_end_s: float | None = None  # time-clock runs: the training time at which warmup ended
        self.val_loss = MeanMetric()
        self.best_val_loss = math.inf
        self._divergence: tuple[torch.Tensor, torch.Tensor] | None = None  # (first bad step or 0, its loss)
        self.read_divergence_every_step = True  # False on a GPU (on_fit_start)
        self.earlier_fit_seconds = 0.0  # training time of the sessions before this one (from the checkpoint)
        self._session_started: float | None = None

    def setup(self, stage: str) -> None:
        if stage == "fit":
            # FLOPs of one training batch (forward + backward), counted on a weightless meta-device copy;
            # the throughput monitor turns this into MFU.
            datamodule = self.trainer.datamodule
            with torch.device("meta"):
                meta_model = Transformer(self.config)
                x = torch.zeros(datamodule.batch_size, datamodule.seq_length, dtype=torch.long)
                self.flops_per_batch = measure_flops(meta_model, lambda: meta_model(x), lambda y: y.sum())

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch, batch_idx):
        loss = self.loss(*batch)
        self.watch_for_divergence(loss)
        self.log("train/loss", loss, prog_bar=True)
        # every logger's x axis is the number of optimizer steps taken, as in summary.json (Lightning's own count
        # starts at 0 for the first step's metrics): a metric named "step" sets it
        self.log("step", float(self.global_step + 1))
        return loss

    def watch_for_divergence(self, loss: torch.Tensor) -> None:
        """Raises `TrainingDivergedError`, naming the first step whose training loss was not finite.

        On a GPU, reading the check every step would make the host wait for the device at every step; there the
        first bad step and its loss are kept on the device and read at logging steps (and before validation, so a
        checkpoint never holds the diverged weights). On a CPU reading costs nothing: the run stops at that step.
        """
        loss = loss.detach()
        if self.read_divergence_every_step:
            if not torch.isfinite(loss):
                self.diverged(self.global_step + 1, float(loss))
            return
        bad = ~torch.isfinite(loss)
        if self._divergence is None:
            self._divergence = (torch.zeros((), dtype=torch.long, device=loss.device), torch.zeros_like(loss))
        first_step, first_loss = self._divergence
        new = bad & (first_step == 0)
        self._divergence = (
            torch.where(new, self.global_step + 1, first_step),
            torch.where(new, loss, first_loss),
        )
        if self.trainer._logger_connector.should_update_logs:
            self.raise_if_diverged()

    def raise_if_diverged(self) -> None:
        """Raises for a bad step recorded on the device (see `watch_for_divergence`), if there is one."""
        if self._divergence is not None and int(self._divergence[0]):
            self.diverged(int(self._divergence[0]), float(self._divergence[1]))

    def diverged(self, step: int, loss: float) -> None:
        raise TrainingDivergedError(
            f"The training loss became {loss} at step {step}; lower optimizer.lr or keep gradient clipping on "
            "(trainer.gradient_clip_val). Checkpoints written before this step are intact."
        )

    def on_fit_start(self) -> None:
        self.read_divergence_every_step = self.device.type != "cuda"
        self._session_started = time.perf_counter()

    @property
    def fit_seconds(self) -> float:
        """Seconds of training so far, over every session of the run: a resumed run's checkpoint brings the time
        of the sessions before it, as it brings their steps, and the pauses between sessions count nothing."""
        if self._session_started is None:
            return self.earlier_fit_seconds
        return self.earlier_fit_seconds + time.perf_counter() - self._session_started

    def on_validation_start(self) -> None:
        self.raise_if_diverged()  # (on a GPU, a bad step since the last logging step is read here)

    def on_before_optimizer_step(self, optimizer) -> None:
        # the norm before clipping, so it shows when clipping is active; only on logging steps (it costs a pass)
        if self.trainer._logger_connector.should_update_logs:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads))
            self.log("train/lr", optimizer.param_groups[0]["lr"])  # every group follows the same schedule

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Lightning refuses to clip for fused optimizers under mixed precision, because of fp16's gradient
        # scaler; with bf16 or fp32 there is no scaler, the gradients are true-scale, and clipping here is exact.
        if gradient_clip_val and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(self.parameters(), gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch, batch_idx):
        total, count = summed_loss(self.model, *batch)
        # NaN as inf: the metric would drop a NaN batch (with a warning), and one is enough to call the model diverged
        self.val_loss.update(torch.nan_to_num(total / count, nan=math.inf), weight=count)

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute()  # synchronised across processes
        self.val_loss.reset()
        if not torch.isfinite(loss) and not self.trainer.sanity_checking:
            # raised before the checkpoint callback runs, so no broken weights are saved
            raise TrainingDivergedError(
                f"The validation loss became {loss.item()} after step {self.global_step}; lower optimizer.lr or keep "
                "gradient clipping on (trainer.gradient_clip_val). Checkpoints written before this step are intact."
            )
        self.log("step", float(self.global_step))  # validation after N steps is logged at step N
        self.log("val/loss", loss, prog_bar=True, sync_dist=False)
        self.log("val/ppl", torch.exp(loss))
        self.log("val/bpc", loss / math.log(2))
        if not self.trainer.sanity_checking:
            self.best_val_loss = min(self.best_val_loss, float(loss))
            self.log("val/best_loss", self.best_val_loss)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer over the model's parameter groups. Settings it refuses (a negative lr, a beta outside
        [0, 1)) are a `ConfigError`: train.py builds one before the run starts, so such a run fails at once."""
        try:
            return self.optimizer_factory(parameter_groups(self.model))
        except (ValueError, TypeError) as error:
            message = f"The optimizer refused its settings ({error}); correct the optimizer.* value."
            raise ConfigError(message) from error

    def configure_optimizers(self):
        optimizer = self.build_optimizer()
        if self.clock == "time":
            multiplier = self.time_schedule(self.training_timer())
        else:
            total_steps = self.total_steps or int(self.trainer.estimated_stepping_batches)
            multiplier = functools.partial(
                cosine_schedule,
                warmup_steps=self.warmup_steps,
                total_steps=total_steps,
                min_lr_ratio=self.min_lr_ratio,
                shape=self.shape,
                cooldown=self.cooldown,
            )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def training_timer(self) -> Timer:
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining() is None:
            raise ConfigError(
                "lr_schedule.clock=time follows the time budget, but the run has none; set trainer.max_time "
                "(DD:HH:MM:SS), or use lr_schedule.clock=steps."
            )
        return timer

    def time_schedule(self, timer: Timer) -> Callable[[int], float]:
        """The multiplier on the time clock: the same warmup in steps, then a decay that ends with the budget."""
        duration = timer.time_elapsed() + timer.time_remaining()

        def multiplier(step: int) -> float:
            if step < self.warmup_steps:
                return warmup_cosine(step, self.warmup_steps, 0.0, self.min_lr_ratio, self.shape, self.cooldown)
            elapsed = timer.time_elapsed("train")
            if self.trainer.world_size > 1:  # every process must step with the same learning rate
                elapsed = self.trainer.strategy.broadcast(elapsed)
            if self.warmup_end_s is None:
                self.warmup_end_s = elapsed
            remaining = duration - self.warmup_end_s
            progress = (elapsed - self.warmup_end_s) / remaining if remaining > 0 else 1.0
            return warmup_cosine(step, self.warmup_steps, progress, self.min_lr_ratio, self.shape, self.cooldown)

        return multiplier

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "format": CHECKPOINT_FORMAT,
            "model_config": self.config.to_dict(),
            "vocab": self.tokenizer.vocab,
            "data": self.data_info(),
        }
        # dropout's random stream, so a resumed run draws the same masks as an uninterrupted one
        checkpoint["rng_states"] = {"torch": torch.get_rng_state()}
        checkpoint["lr_schedule"] = {"warmup_end_s": self.warmup_end_s}
        checkpoint["best_val_loss"] = self.best_val_loss
        checkpoint["fit_seconds"] = self.fit_seconds
        if torch.cuda.is_available():
            checkpoint["rng_states"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.warmup_end_s = checkpoint.get("lr_schedule", {}).get("warmup_end_s")
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)
        # a checkpoint from before the clock was saved: its time budget's Timer, where the run had one
        timer = checkpoint.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train", 0.0)
        self.earlier_fit_seconds = float(checkpoint.get("fit_seconds", timer))
        states = checkpoint.get("rng_states", {})
        if "torch" in states:
            torch.set_rng_state(states["torch"].cpu())
        if "cuda" in states and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in states["cuda"]])

    def data_info(self) -> dict:
        """Which corpus and splits this model was trained on, so evaluation can find the validation and test splits."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or datamodule.corpus is None:
            return {}
        return {
            "path": str(datamodule.corpus_path.resolve()),
            "sha256": datamodule.corpus.sha256,
            "val_fraction": datamodule.val_fraction,
            "split_sizes": datamodule.split_sizes,
            "train_fraction": datamodule.train_fraction,
            "encoding": datamodule.encoding,
            "newlines": datamodule.newlines,
            "seq_length": datamodule.seq_length,
            "batch_size": datamodule.batch_size,
        }
