"""A short text sample from the model after validations and at the end of a run."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from lm.generate import generate
from lm.tokenizer import CharTokenizer


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
