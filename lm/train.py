"""The training run: from a composed config to a trained model, its checkpoints, logs and `summary.json`.

`run(cfg)` is what `scripts/train.py` calls for each run or sweep job; `train(cfg)` trains one run and returns its
final metrics. Tests and `scripts/benchmark.py` call `train` in-process with a config from `lm.config.compose_config`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import signal
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

import lm.config  # noqa: F401  (the resolvers a composed config interpolates)
from lm.callbacks import CompileTime, InterruptedTraining, ResumableProgressBar, ValidationCost
from lm.checkpoint import check_resumable, model_state, read_checkpoint
from lm.console import full_errors, project_error, report_errors
from lm.data import CharDataModule
from lm.errors import ConfigError, is_count
from lm.evaluate import evaluate, results_table, write_eval_report
from lm.files import write_atomically
from lm.hardware import emulated_bf16_warning, resolve_precision, retain_freed_memory, training_device_type
from lm.model import TransformerConfig
from lm.module import LanguageModel
from lm.run_log import logged_to, start_logging
from lm.run_settings import (
    budget_seconds,
    check_checkpoint,
    check_run_settings,
    clock_time,
    out_of_memory_advice,
    resume_checkpoint,
    run_hparams,
    run_length,
    should_compile,
    threads_per_job,
)
from lm.sweep import (
    StopWithSweep,
    clear_attempt,
    end_stopped_sweep,
    in_sweep_process,
    job_state,
    listen_for_stop,
    request_stop,
    stop_signal,
)


def run(cfg: DictConfig) -> float | None:
    """One run or one sweep job, as `scripts/train.py` launches it; returns the final val/loss, the value a Hydra
    sweeper optimises (None: a failed trial)."""
    with logged_to(cfg.paths.run_dir):  # what the console shows, also in <run dir>/train.log
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            metrics = sweep_job(cfg)
        else:
            metrics = report_errors(single_run)(cfg)
    return metrics.get("val/loss")


@dataclass
class TrainingJob:
    """Everything a run trains with, built from its config before anything trains."""

    datamodule: CharDataModule
    module: LanguageModel
    trainer: L.Trainer
    ckpt_path: str | None
    precision: str
    hparams: dict  # as the loggers got them, for summary.json

    def timing(self) -> dict:
        """For summary.json: the training time of every session so far, and each validation's end and cost."""
        timing = {"fit_seconds": self.module.fit_seconds}
        if costs := [c for c in self.trainer.callbacks if isinstance(c, ValidationCost)]:
            timing["validation_seconds"] = costs[0].seconds
            timing["validations"] = costs[0].records
        return timing


def train(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> dict[str, float]:
    """Trains one run from a composed config (`callbacks`: more callbacks, after the config's own); returns the
    final metrics (val/loss, val/bpc, ...). Writes <run dir>/summary.json when the run finishes."""
    job = build(cfg, callbacks)
    try:
        job.trainer.fit(job.module, datamodule=job.datamodule, ckpt_path=job.ckpt_path)
    except torch.OutOfMemoryError as error:
        raise ConfigError(out_of_memory_advice(error, job.module, cfg)) from error
    except InterruptedTraining as stop:
        stop.timing = job.timing()  # an interrupted sweep job's summary.json records how far it got
        raise
    return finish(cfg, job)


def build(cfg: DictConfig, callbacks: Sequence[L.Callback] = ()) -> TrainingJob:
    """Checks the run's settings (bad input fails here, before anything is written), then builds its data, model,
    optimizer, loggers and trainer, and says what it will train."""
    check_run_settings(cfg)
    ckpt_path = resume_checkpoint(cfg)  # fail fast on a bad resume= or ckpt_path=
    if cfg.malloc_reuse:
        retain_freed_memory()
    if threads := threads_per_job(cfg):
        torch.set_num_threads(threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    tokenizer = datamodule.tokenizer  # opens (and if needed downloads and encodes) the corpus

    config, compile_model = model_config(cfg, tokenizer.vocab_size)
    limits, clock = run_length(cfg)
    fine_tuning, spent = check_checkpoint(cfg, ckpt_path, config, datamodule, limits) if ckpt_path else (None, 0.0)
    schedule = {**OmegaConf.to_container(cfg.lr_schedule), "clock": clock}
    module = LanguageModel(config, tokenizer.vocab, optimizer=instantiate(cfg.optimizer), **schedule)
    if cfg.get("init_from"):
        fine_tuning = initialise_from(cfg.init_from, module, datamodule)
    module.build_optimizer()  # settings the optimizer refuses fail here, before loggers write anything

    device_type = training_device_type(cfg.trainer.accelerator)
    if should_compile(compile_model, device_type):
        module.model.compile()  # in place: checkpoints keep the plain parameter names
    precision, note = resolve_precision(cfg.trainer.precision, device_type)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 products (Ampere and later): what Lightning advises
    loggers = build_loggers(cfg)
    trainer = build_trainer(cfg, module, loggers, [*build_callbacks(cfg, module), *callbacks], precision, limits)
    start_logging()  # checks passed: from here the run's train.log gets what the console shows
    if trainer.is_global_zero:
        say_what_trains(cfg, module, tokenizer.vocab_size, limits, clock, precision, note, fine_tuning, spent)
    hparams = run_hparams(cfg, precision=precision, clock=clock, **limits)
    hparams["parameters"] = module.model.num_parameters()
    for logger in loggers:
        logger.log_hyperparams(hparams)
    return TrainingJob(datamodule, module, trainer, ckpt_path, precision, hparams)


def initialise_from(source: str, module: LanguageModel, datamodule) -> str:
    """Loads the weights of `source` (a checkpoint or run directory, its best checkpoint) into the new run's model,
    after the same checks as a fine-tuning ckpt_path= (model settings, vocabulary); returns the line that says so."""
    checkpoint, path = read_checkpoint(source, fix="pass init_from= a .ckpt file or a run directory")
    corpus = datamodule.corpus.sha256
    note = check_resumable(checkpoint, path, module.config, datamodule.tokenizer.vocab, corpus, False, True)
    module.model.load_state_dict(model_state(checkpoint))
    return note


def model_config(cfg: DictConfig, vocab_size: int) -> tuple[TransformerConfig, bool | str]:
    """The model's shape from `cfg.model` (its `model.compile` setting apart, returned beside it)."""
    settings = OmegaConf.to_container(cfg.model, resolve=True)
    compile_setting = settings.pop("compile", False)
    return TransformerConfig(vocab_size=vocab_size, **settings), compile_setting


def build_loggers(cfg: DictConfig) -> list:
    """The config's loggers, instantiated; logger=wandb without the wandb package is one sentence."""
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if "Wandb" in logger_cfg.get("_target_", "") and importlib.util.find_spec("wandb") is None:
            raise ConfigError('logger=wandb needs the wandb package; install it with pip install -e ".[wandb]".')
        loggers.append(instantiate(logger_cfg))
    return loggers


def build_callbacks(cfg: DictConfig, module: LanguageModel) -> list[L.Callback]:
    """The config's callbacks, the compile timer for a compiled model, and the project's progress bar."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if module.model._compiled_call_impl is not None:  # nn.Module.compile's
        callbacks.append(CompileTime())
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # the same bar for every install: Lightning takes Rich's whenever `rich` can be imported (optuna pulls it
        # in), and that one draws nothing until training ends when its output is a log file
        callbacks.append(ResumableProgressBar())
    return callbacks


def build_trainer(
    cfg: DictConfig, module: LanguageModel, loggers: list, callbacks: list, precision: str, limits: dict
) -> L.Trainer:
    """`cfg.trainer` instantiated with the run's length, precision, loggers and callbacks; a value Lightning
    refuses is one sentence."""
    try:
        return instantiate(cfg.trainer, **limits, precision=precision, logger=loggers or False, callbacks=callbacks)
    except InstantiationException as error:
        if isinstance(error.__cause__, MisconfigurationException):  # Lightning's word for a bad trainer.* value
            raise ConfigError(f"trainer: {error.__cause__}") from error
        raise


def say_what_trains(
    cfg: DictConfig,
    module: LanguageModel,
    vocab_size: int,
    limits: dict,
    clock: str,
    precision: str,
    note: str,
    fine_tuning: str | None,
    spent: float = 0.0,
) -> None:
    """The run's start line (and a resume, fine-tuning or emulated-bf16 notice before it), on stderr; `spent`:
    seconds of the time budget a resumed run has already trained."""
    if fine_tuning:
        print(f"[transformer-lm] {fine_tuning}", file=sys.stderr, flush=True)
    if warning := emulated_bf16_warning(precision, training_device_type(cfg.trainer.accelerator)):
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if clock == "time":
        length = f"a time budget of {limits['max_time']}"
        if spent > 0 and (budget := budget_seconds(limits["max_time"])) is not None:
            length += f", {clock_time(budget - spent)} of it left after the {clock_time(spent)} already trained"
    else:
        length = f"{limits['max_steps']} steps" if limits["max_steps"] > 0 else f"{cfg.trainer.max_epochs} epochs"
    config = module.config
    print(
        f"[transformer-lm] {note}; {length} (learning rate follows the {clock} clock); "
        f"{config.n_layer} layers x {config.n_embd} wide, "
        f"{module.model.num_parameters() / 1e6:.2f}M parameters, vocabulary of {vocab_size}, "
        f"run dir {cfg.paths.run_dir}",
        file=sys.stderr,
        flush=True,
    )


def finish(cfg: DictConfig, job: TrainingJob) -> dict[str, float]:
    """After fitting: the final metrics line, and for a run that was not interrupted, the final evaluation and
    summary.json (rank 0). Returns the final val/* metrics."""
    trainer, module, datamodule = job.trainer, job.module, job.datamodule
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero and metrics:
        print(
            "[transformer-lm] final " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())),
            file=sys.stderr,
            flush=True,
        )
    if not trainer.is_global_zero or trainer.interrupted:
        return metrics
    evaluations, train_evaluations, scaled = evaluate_final_model(cfg, module, datamodule, job.precision)
    summary = {
        "status": "finished",
        "metrics": metrics,
        "global_step": trainer.global_step,
        **job.timing(),
        "tokens_per_step": datamodule.batch_size * datamodule.seq_length * trainer.world_size,
        # forward and backward, attention included (counted on a meta-device copy): the x axis of loss-vs-compute
        "flops_per_step": module.flops_per_batch * trainer.accumulate_grad_batches * trainer.world_size,
        "parameters": module.model.num_parameters(),
        "seq_length": module.config.seq_length,
        "eval_base_length": cfg.final_eval.get("base_length") or module.config.seq_length,
        "threads": torch.get_num_threads(),
        "hparams": job.hparams,
        "evaluations": [r.to_dict() for r in evaluations],
        "train_evaluations": [r.to_dict() for r in train_evaluations],
    }
    if scaled:
        summary["scaled_evaluations"] = {method: [r.to_dict() for r in rows] for method, rows in scaled.items()}
    write_atomically(
        Path(cfg.paths.run_dir) / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2))
    )
    return metrics


def evaluate_final_model(
    cfg: DictConfig, module: LanguageModel, datamodule, precision: str
) -> tuple[list, list, dict[str, list]]:
    """With `final_eval.context_multiples` (e.g. [1, 2, 4]), the final model's loss on the validation split at
    those multiples of the training context, and with `final_eval.train_split`, on the start of the training data
    it saw (as many characters as the validation split); with `final_eval.rope_scalings` (a RoPE model), also at
    the multiples above 1 with each context extension by the multiple. Written to <run dir>/final.eval.md and .json
    like evaluate.py's. Returns (validation results, training-data results, {scaling: results})."""
    multiples = list(cfg.final_eval.context_multiples or [])
    if not all(is_count(m) for m in multiples):
        raise ConfigError(f"final_eval.context_multiples={multiples} must be positive integers, e.g. [1,2,4].")
    on_train = bool(cfg.final_eval.get("train_split", False))
    # context extensions are RoPE's alone (xPos rotates too, but takes none)
    scalings = list(cfg.final_eval.get("rope_scalings") or []) if module.config.pos_encoding.name == "rope" else []
    if not multiples and not on_train:
        return [], [], {}
    # the multiples multiply the training context, or final_eval.base_length (a fine-tuned model's original length)
    seq_length, batch_size = module.config.seq_length, cfg.final_eval.batch_size
    base = cfg.final_eval.get("base_length") or seq_length
    dtype = torch.bfloat16 if "bf16" in precision else None
    val = datamodule.split("val")
    results = [evaluate(module.model, val, m * base, batch_size, dtype) for m in multiples]
    tables = [f"Validation split:\n\n{results_table(results, seq_length)}"] if results else []
    scaled = {}
    if scalings:  # the same weights read with each context extension; then the model as trained again
        model, trained = module.model, module.config.pos_encoding
        for scaling in scalings:
            scaled[scaling] = []
            for m in (m for m in multiples if m > 1):
                model.extend_context(scaling, float(m), trained.original_length)
                scaled[scaling].append(evaluate(model, val, m * base, batch_size, dtype))
                scaled[scaling][-1].note = f"{scaling} x{m}"
        model.extend_context(trained.scaling, trained.scaling_factor, trained.original_length)
        rows = [r for method in scaled.values() for r in method]
        tables.append(
            f"With RoPE's context extensions, by the factor each length needs:\n\n{results_table(rows, seq_length)}"
        )
    train_results = []
    if on_train:
        train = datamodule.split("train")[: len(val)]
        train_results = [evaluate(module.model, train, seq_length, batch_size, dtype)]
        tables.append(
            f"Training data (its first {len(train)} characters):\n\n{results_table(train_results, seq_length)}"
        )
    table = "\n\n".join(tables)
    report = {
        "checkpoint": "final weights",
        "split": "validation split",
        "results": [r.to_dict() for r in results],
        "train_results": [r.to_dict() for r in train_results],
        "scaled_results": {method: [r.to_dict() for r in rows] for method, rows in scaled.items()},
    }
    write_eval_report(Path(cfg.paths.run_dir) / "final", report, table, "The final model")
    print(f"[transformer-lm] the final model:\n{table}", file=sys.stderr)
    return results, train_results, scaled


def sweep_job(cfg: DictConfig) -> dict[str, float]:
    """One job of a multirun. A failure is reported (an `error:` line, and summary.json with status "failed") and
    the sweep goes on with its other jobs; an Optuna search records the trial as failed. A signal to the sweep
    stops all of it (`lm.sweep`): this job saves last.ckpt and is recorded as interrupted, and no job starts after
    it; a signal to this job's process alone stops this job the same way, and the sweep goes on. In a sweep
    continued with `resume=<sweep dir>`, a finished job is kept as it is (its metrics returned), an interrupted one
    goes on from its last.ckpt, and a failed or unstarted one runs from the start."""
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    job_dir = Path(cfg.paths.run_dir)
    if signum := stop_signal(sweep_dir):
        # what Hydra made for the job goes: a continued sweep makes it again
        shutil.rmtree(job_dir, ignore_errors=True)
        print(f"[transformer-lm] {job_dir.name}: not started ({signal.Signals(signum).name} stopped the sweep)")
        if in_sweep_process():
            end_stopped_sweep()
        return {}
    listen_for_stop()
    if cfg.resume and Path(cfg.resume).resolve() == sweep_dir.resolve():
        state = job_state(job_dir)
        if state.state == "finished":
            metrics = state.summary.get("metrics", {})
            shown = "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items()))
            print(f"[transformer-lm] {job_dir.name}: finished earlier ({shown}); kept as it is", file=sys.stderr)
            return metrics
        cfg.resume = str(job_dir) if state.resumable else None
        if not state.resumable:
            clear_attempt(job_dir)  # failed, or stopped before its first checkpoint: from the start
    try:
        return train(cfg, callbacks=[StopWithSweep(sweep_dir)])
    except InterruptedTraining as stop:  # the sweep was stopped, or this job's process got a signal
        if in_sweep_process():
            request_stop(sweep_dir, stop.signum)  # the basic launcher's jobs run in the sweep's own process
        if not stop.quiet:
            name = signal.Signals(stop.signum).name
            print(f"[transformer-lm] {name}: saved {stop.checkpoint} at step {stop.step}", file=sys.stderr)
            summary = {"status": "interrupted", "step": stop.step, "signal": name, **getattr(stop, "timing", {})}
            write_atomically(job_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary)))
        if in_sweep_process():
            end_stopped_sweep()
        return {}
    except Exception as error:
        if full_errors():
            traceback.print_exc()
        error = project_error(error) or error  # a config's own sentence, not Hydra's wrapping of it
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message} (in {cfg.paths.run_dir}; the sweep goes on)", file=sys.stderr, flush=True)
        summary = {"status": "failed", "error": message}
        write_atomically(job_dir / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary)))
        return {}


def single_run(cfg: DictConfig) -> dict[str, float]:
    """One run (not a sweep's job): a run that fails before it writes anything of its own (bad input) leaves no
    directory behind, so outputs/runs/ lists runs only; a sweep's failed job keeps its summary.json instead."""
    try:
        return train(cfg)
    except BaseException:
        remove_if_nothing_was_run(Path(cfg.paths.run_dir))
        raise


def remove_if_nothing_was_run(run_dir: Path) -> None:
    """Deletes `run_dir` if it holds only what Hydra writes at start (.hydra/) and train.log: nothing was trained;
    and its parent (outputs/runs/) if that is left empty."""
    if not run_dir.is_dir():
        return
    if {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # not empty: other runs live there
            run_dir.parent.rmdir()
