"""A training run's settings, checked and worked out before anything trains: what to resume from, how long to run
and on which clock the learning rate follows, threads, compiling, the hyperparameters to log, and what to say when
a GPU runs out of memory."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lm.checkpoint import check_resumable, read_checkpoint
from lm.errors import ConfigError, is_count, is_number
from lm.hub.load import is_export
from lm.model import TransformerConfig
from lm.module import LanguageModel
from lm.run_log import is_rank_zero


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from: `ckpt_path=`, or `resume=<run dir>`'s last checkpoint."""
    if cfg.resume and cfg.ckpt_path:
        raise ConfigError("Pass either resume=<run dir> or ckpt_path=<file>, not both.")
    if cfg.get("init_from") and (cfg.resume or cfg.ckpt_path):
        raise ConfigError(
            "init_from= starts a new run from a checkpoint's weights, while resume= and ckpt_path= go on with its "
            "optimizer and schedule; pass one of them."
        )
    if cfg.ckpt_path:
        if is_export(Path(cfg.ckpt_path)):  # weights only: no optimizer state or step for Lightning to go on from
            raise ConfigError(
                f"ckpt_path={cfg.ckpt_path} is an exported model, which keeps the weights but not the optimizer or "
                f"schedule to go on with; start a new run from its weights with init_from={cfg.ckpt_path}."
            )
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file; pass a .ckpt file, or resume=<run dir>.")
        return str(cfg.ckpt_path)
    if cfg.resume:
        if not Path(cfg.resume).is_dir():
            raise ConfigError(
                f"resume={cfg.resume}: there is no such directory; pass the directory of an earlier run, e.g. "
                "resume=outputs/runs/<run>."
            )
        last = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"resume={cfg.resume} has no checkpoints/last.ckpt; pass the directory of an earlier run."
            )
        return str(last)
    return None


def keep_resumed_settings(cfg: DictConfig, step: int) -> None:
    """<run dir>/.hydra/resumed_at_<step>/: the config and overrides of a resumed run, beside the original's
    (written by rank 0: every process of a run resumed on several reads the same directory)."""
    if not is_rank_zero():
        return
    folder = Path(cfg.paths.run_dir) / ".hydra" / f"resumed_at_{step}"
    folder.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, folder / "config.yaml")
    if HydraConfig.initialized():
        OmegaConf.save(OmegaConf.create(list(HydraConfig.get().overrides.task)), folder / "overrides.yaml")


def run_length(cfg: DictConfig) -> tuple[dict, str]:
    """The trainer's limits and the learning-rate schedule's clock.

    A run that sets no length of its own (trainer.max_steps, max_epochs or max_time) trains for
    `default_time_budget`. The schedule follows steps when the run is bounded by steps or epochs (max_time is then
    only a guard), and the clock when it is bounded by time alone; lr_schedule.clock=steps|time says so instead.
    """
    trainer = cfg.trainer
    by_steps = (trainer.max_steps or -1) > 0 or (trainer.max_epochs or -1) > 0
    max_time = trainer.max_time if (by_steps or trainer.max_time) else cfg.default_time_budget
    clock = cfg.lr_schedule.clock
    if clock == "auto":
        clock = "steps" if by_steps else "time"
    return {"max_steps": trainer.max_steps or -1, "max_time": max_time}, clock


def check_checkpoint(
    cfg: DictConfig, ckpt_path: str, config: TransformerConfig, datamodule, limits: dict
) -> tuple[str | None, float]:
    """Refuses, before Lightning loads it, a checkpoint this run cannot go on from (damaged, another model or
    vocabulary, resume= on other data, no steps left). Returns the line that says what a run goes on from (a
    resumed run's step, or that a run is fine-tuning) and the seconds of training the checkpoint's run spent,
    which a time budget counts (Lightning's Timer goes on from them)."""
    checkpoint, path = read_checkpoint(ckpt_path)
    continuing = bool(cfg.resume)
    note = check_resumable(checkpoint, path, config, datamodule.tokenizer.vocab, datamodule.corpus.sha256, continuing)
    step = checkpoint.get("global_step", 0)
    if 0 < limits["max_steps"] <= step:
        option = f"resume={cfg.resume}" if continuing else f"ckpt_path={path}"
        raise ConfigError(
            f"{option} is at step {step} and trainer.max_steps={limits['max_steps']} counts from the start of that "
            f"run, so no step is left; set trainer.max_steps above {step}."
        )
    averaged = checkpoint.get("callbacks", {}).get("EMAWeights", {})
    if "training_weights" in averaged and (cfg.get("callbacks") or {}).get("ema_weights", {}).get("decay") is None:
        # its weights are the average: training on from them, without the weights it trained, would change the run
        option = f"resume={cfg.resume}" if continuing else f"ckpt_path={path}"
        raise ConfigError(
            f"{option}: that run kept an average of its weights, which its checkpoints hold; pass "
            f"callbacks.ema_weights.decay={averaged['decay']} to train on, or start a new run from the average with "
            f"init_from={path}."
        )
    if continuing:
        keep_resumed_settings(cfg, step)
        note = note or f"resuming the run in {cfg.resume} from step {step} (its checkpoints/last.ckpt)"
    spent = checkpoint.get("callbacks", {}).get("Timer", {}).get("time_elapsed", {}).get("train", 0.0)
    return note, float(spent)


def budget_seconds(max_time) -> float | None:
    """Seconds in a "DD:HH:MM:SS" budget; None for another form (Lightning also takes a dict or a timedelta)."""
    parts = str(max_time).split(":")
    try:
        days, hours, minutes, seconds = (float(part) for part in parts)
    except ValueError:
        return None
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def clock_time(seconds: float) -> str:
    """Seconds as "DD:HH:MM:SS", the way trainer.max_time is written."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    return f"{days:02d}:{hours:02d}:{minutes:02d}:{secs:02d}"


def should_compile(setting, device_type: str) -> bool:
    """`model.compile`: true, false, or auto, which compiles on CUDA only: on CPUs the project's own kernels beat
    Inductor's code (docs/speed.md). Compiled graphs are cached on disk by Inductor, so later runs and the jobs of a
    sweep on the same machine compile faster."""
    if setting == "auto":
        return device_type == "cuda"
    if isinstance(setting, bool):
        return setting
    raise ConfigError(f"model.compile={setting} must be true, false or auto.")


def check_run_settings(cfg: DictConfig) -> None:
    """Settings that Lightning or PyTorch would otherwise reject mid-run with a traceback, or not at all."""
    if not is_count(cfg.seed, minimum=0) or cfg.seed >= 2**32:
        raise ConfigError(f"seed={cfg.seed} must be an integer from 0 to 4294967295.")
    steps = cfg.trainer.max_steps
    if steps is not None and steps != -1 and (not is_count(steps)):
        raise ConfigError(
            f"trainer.max_steps={steps} must be a positive number of steps, or -1 for no step limit (the run is then "
            "bounded by trainer.max_epochs or trainer.max_time, or else default_time_budget)."
        )
    interval = cfg.trainer.val_check_interval
    if interval is not None and (not is_number(interval) or interval <= 0):
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be a positive number of steps (or a fraction of an epoch)."
        )


def threads_per_job(cfg: DictConfig) -> int | None:
    """torch threads for this process: `threads`, or with `threads=auto` under a launcher that runs n_jobs at once
    (hydra/launcher=joblib), the cores divided among the jobs, so n_jobs x threads never exceeds them, and under
    submitit the CPUs each job asked for (cpus_per_task); None: torch's own default (all cores)."""
    if cfg.threads != "auto":
        if not is_count(cfg.threads):
            raise ConfigError(f"threads={cfg.threads} must be a positive integer or auto.")
        return cfg.threads
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    launcher = HydraConfig.get().launcher
    if launcher.get("cpus_per_task"):  # submitit (local or SLURM): the CPUs each job was given
        return int(launcher.cpus_per_task)
    n_jobs = launcher.get("n_jobs")
    if not n_jobs:
        return None
    cores = os.cpu_count() or 1
    n_jobs = cores if n_jobs < 0 else min(n_jobs, cores)
    return max(1, cores // n_jobs)


def run_hparams(cfg: DictConfig, **resolved) -> dict:
    """The settings that tell runs apart, for TensorBoard's HParams tab and hparams.yaml: the config groups chosen,
    then model, optimizer, data, schedule and run-length values (no paths, loggers or callbacks)."""
    hparams: dict = {}
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        groups = ("model", "optimizer", "experiment", "variant")
        hparams.update({g: choices.get(g) for g in groups if g in choices and (g != "variant" or choices.get(g))})
    container = OmegaConf.to_container(cfg, resolve=True)
    hparams["model"] = {**{"size": hparams.pop("model", None)}, **container["model"]}
    hparams["optimizer"] = {
        "name": hparams.pop("optimizer", None) or container["optimizer"]["_target_"].rsplit(".", 1)[-1],
        **{k: v for k, v in container["optimizer"].items() if not k.startswith("_")},
    }
    keys = ("path", "seq_length", "batch_size", "val_fraction", "split_sizes", "train_fraction")
    hparams["data"] = {k: container["data"].get(k) for k in keys}
    hparams["lr_schedule"] = {**container["lr_schedule"], "clock": resolved.pop("clock")}
    hparams["trainer"] = {
        **{k: container["trainer"][k] for k in ("gradient_clip_val", "accumulate_grad_batches", "devices")},
        **resolved,
    }
    hparams["seed"] = cfg.seed
    return hparams


def out_of_memory_advice(error: torch.OutOfMemoryError, module: LanguageModel, cfg: DictConfig) -> str:
    """One sentence for a GPU out of memory: what was asked of it, and what to lower."""
    config, batch_size = module.config, cfg.data.batch_size
    memory = ""
    if torch.cuda.is_available():
        memory = f" of {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB"
    accumulate = cfg.trainer.accumulate_grad_batches * 2
    return (
        f"The GPU{memory} ran out of memory ({str(error).splitlines()[0][:80]}) training "
        f"{module.model.num_parameters() / 1e6:.2f}M parameters ({config.n_layer} layers x {config.n_embd} wide) on "
        f"data.batch_size={batch_size} x data.seq_length={config.seq_length}; lower data.batch_size (e.g. "
        f"data.batch_size={max(1, batch_size // 2)} trainer.accumulate_grad_batches={accumulate} keeps the tokens "
        "per step), data.seq_length, or the model size (model=...)."
    )
