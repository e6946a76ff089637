"""An exponential moving average of the weights (EMA), which validation, the checkpoints and the final model use."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn

from lm.errors import ConfigError, is_number


def ema_decay(decay: float, updates: int) -> float:
    """The decay of update number `updates` (0 first): `decay`, or less while few updates are in, as TensorFlow's
    ExponentialMovingAverage does with `num_updates`, so that a short run's average is not mostly its initial
    weights."""
    return min(decay, (1 + updates) / (10 + updates))


class EMAWeights(L.Callback):
    """Keeps an exponential moving average of the model's weights over the training steps (Polyak averaging;
    modded-nanogpt and most diffusion models evaluate such an average), and hands it to everything that reads the
    model: every validation measures it, `best.ckpt` and `last.ckpt` store it as their weights (so evaluation,
    generation, `init_from=` and export read it), and the run ends with it in the model.

    After each optimizer step, average <- d * average + (1 - d) * weights, with d = `ema_decay(decay, updates)`,
    in float32 whatever the training precision. The weights being trained go on unchanged: each checkpoint keeps
    them, with the average's update count, in this callback's state, and resuming trains on from them, so a resumed
    run matches an uninterrupted one. With DDP every process averages its own (identical) weights: no communication.

    Args:
        decay: the average's decay per step, in (0, 1): about 1 / (1 - decay) steps make up the average. None: off
            (the callback does nothing).
    """

    def __init__(self, decay: float | None = None):
        if decay is not None and (not is_number(decay) or not 0 < decay < 1):
            raise ConfigError(
                f"callbacks.ema_weights.decay={decay} must be between 0 and 1 (e.g. 0.999), or null for no average."
            )
        self.decay = decay
        self.updates = 0
        self.average: list[torch.Tensor] | None = None
        self._updated_step = -1
        self._training_weights: list[torch.Tensor] | None = None  # the trained weights, while the average is in
        self._loaded: dict | None = None  # a resumed run's saved state, applied once the model is restored
        self._params: list[torch.nn.Parameter] = []
        self._ended = False

    @staticmethod
    def parameters(pl_module) -> list[torch.nn.Parameter]:
        return list(pl_module.model.parameters())

    def setup(self, trainer: L.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.decay is not None:
            self._params = self.parameters(pl_module)

    def on_fit_start(self, trainer: L.Trainer, pl_module) -> None:
        if self.decay is None:
            return
        self._ended = False
        # After a resume the model holds the checkpoint's weights, which are the average: it starts from them,
        # and the trained weights saved beside them go back into the model.
        params = self.parameters(pl_module)
        self.average = [p.detach().float().clone() for p in params]
        if self._loaded is not None:
            with torch.no_grad():
                for p, saved in zip(params, self._loaded["training_weights"], strict=True):
                    p.copy_(saved.to(p.device))
            self.updates = int(self._loaded["updates"])
            self._loaded = None
        self._updated_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.average is None or trainer.global_step <= self._updated_step:
            return  # off, or no optimizer step in this batch (gradient accumulation)
        weight = 1.0 - ema_decay(self.decay, self.updates)
        params = [p.detach().float() for p in self._params]  # float32 already: no copy
        torch._foreach_lerp_(self.average, params, weight)
        self.updates += 1
        self._updated_step = trainer.global_step

    def swap_in(self, pl_module) -> None:
        """Puts the average into the model, keeping the trained weights aside."""
        if self.average is None or self._training_weights is not None:
            return
        params = self.parameters(pl_module)
        self._training_weights = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self.average, strict=True):
                p.copy_(a)

    def swap_out(self, pl_module) -> None:
        """Puts the trained weights back into the model."""
        if self._training_weights is None:
            return
        with torch.no_grad():
            for p, w in zip(self.parameters(pl_module), self._training_weights, strict=True):
                p.copy_(w)
        self._training_weights = None

    # Validation measures the average. The swap spans the whole validation, text sample included (this callback
    # comes after TextSample), and is undone before the checkpoint callbacks, which always run last, save.
    def on_validation_start(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self.swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not self._ended:
            self.swap_out(pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        # The run's result is the average: the final evaluation, text sample and export read the model as it is now.
        # The trained weights stay aside for a checkpoint written after this (resume= continues from them).
        self.swap_in(pl_module)
        self._ended = True

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        if not self._ended:
            self.swap_out(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module, checkpoint: dict) -> None:
        if self.average is None:
            return
        state, index = checkpoint["state_dict"], {id(p): i for i, p in enumerate(self.parameters(pl_module))}
        # every name of a parameter: a tied head's matrix is the embedding's, under both names
        for name, p in pl_module.model.named_parameters(remove_duplicate=False):
            state[f"model.{name}"] = self.average[index[id(p)]].to(p.dtype).clone()

    def state_dict(self) -> dict:
        if self.average is None:
            return {}
        trained = self._training_weights or [p.detach() for p in self._params]
        return {"decay": self.decay, "updates": self.updates, "training_weights": [w.clone() for w in trained]}

    def load_state_dict(self, state_dict: dict) -> None:
        # without an average of its own (train.py refuses that resume first), or saved without one: nothing to restore
        if self.decay is not None and "training_weights" in state_dict:
            self._loaded = state_dict
