"""Train a character-level Transformer LM. Configuration: conf/train.yaml (see README for the groups).

python scripts/train.py                                   # defaults: Tiny Shakespeare, model=small
python scripts/train.py pos_encoding=rope optimizer=adafactor
python scripts/train.py -m pos_encoding=learned,sinusoidal,rope
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path

import hydra
import lightning as L
import torch
from _common import CONFIG_DIR, full_errors, note_sweep_constants, project_error, report_errors
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf

from lm.callbacks import CompileTime, ResumableProgressBar, ValidationCost
from lm.checkpoint import check_resumable, read_checkpoint
from lm.data import write_atomically
from lm.errors import ConfigError, is_count, is_number
from lm.evaluate import evaluate, results_table, write_report
from lm.hardware import emulated_bf16_warning, resolve_precision, retain_freed_memory, training_device_type
from lm.model import TransformerConfig
from lm.module import LanguageModel


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for logger_cfg in (cfg.get("logger") or {}).values():
        if "Wandb" in logger_cfg.get("_target_", "") and importlib.util.find_spec("wandb") is None:
            raise ConfigError('logger=wandb needs the wandb package; install it with pip install -e ".[wandb]".')
        loggers.append(instantiate(logger_cfg))
    return loggers


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to continue from: `ckpt_path=`, or `resume=<run dir>`'s last checkpoint."""
    if cfg.resume and cfg.ckpt_path:
        raise ConfigError("Pass either resume=<run dir> or ckpt_path=<file>, not both.")
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path} is not a file; pass a .ckpt file, or resume=<run dir>.")
        return str(cfg.ckpt_path)
    if cfg.resume:
        last = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise ConfigError(
                f"resume={cfg.resume} has no checkpoints/last.ckpt; pass the directory of an earlier run."
            )
        return str(last)
    return None


def log_into_resumed_run(argv: list[str]) -> list[str]:
    """`resume=<run dir>` continues that run with its own settings, in its directory, so its logs and checkpoints
    stay in one place: the run's overrides (.hydra/overrides.yaml) come first, then the command's, which win. Hydra
    does not write its .hydra/ files there (they would replace the run's own before the resume is checked): train()
    keeps the resumed run's settings beside them once the checkpoint is accepted."""
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    run_dir = Path(resume[-1].rstrip("/"))
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return argv  # not a run: train() says so, and no directory gets created at that path
    given = {override_key(a) for a in argv[1:] if "=" in a and not a.startswith("-")}
    previous = []
    if (overrides := run_dir / ".hydra" / "overrides.yaml").is_file():
        previous = [
            o
            for o in OmegaConf.to_container(OmegaConf.load(overrides))
            if override_key(o) not in given and not override_key(o).startswith(("hydra.", "paths.", "resume", "ckpt_"))
        ]
    # before the first override of the command: Hydra's parser wants all overrides together
    at = next((i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:at], *previous, *argv[at:], f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def override_key(override: str) -> str:
    """`model` for `model=tiny`, `trainer.max_steps` for `+trainer.max_steps=5`."""
    return override.split("=", 1)[0].lstrip("+~")


def keep_resumed_settings(cfg: DictConfig, step: int) -> None:
    """<run dir>/.hydra/resumed_at_<step>/: the config and overrides of a resumed run, beside the original's."""
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


# On a CPU, five minutes of `small` leave it undertrained, in fp32 (no native bf16: 4-10x fewer FLOP/s) and in bf16
# alike: this recipe ends lower on both (docs/results.md, "The default run", has the runs that chose it: on a 2-core
# Sapphire Rapids in bf16, 1.4740 against `small` + AdamW's 1.5174; on a 2-core EPYC in fp32, 1.53-1.57 against
# 1.61-1.63 with AdamW).
CPU_RECIPE = {
    "model": "mini",
    "optimizer": "muon",  # 0.14 nats below AdamW at equal time, although a step costs ~30% more (Newton-Schulz)
    "optimizer.lr": "1e-2",
    "data.batch_size": "8",
    "lr_schedule.warmup_steps": "30",
    "trainer.val_check_interval": "1000",  # 3,000-7,000 short steps: validating every 250 would eat ~10-15% of them
}

# On a CUDA GPU, five minutes of `small` would waste the card: nanoGPT's Shakespeare size and data (6 x 384, context
# 256, batch 64, dropout 0.2), Muon, compiled (model.compile=auto), and 1,500 steps, which end near the best
# validation loss before this corpus overfits. Issue 24 measured this run on one H200 at an earlier commit: val/loss
# 1.4465 at step 1,500, in 60 s of a process that also compiled (nanoGPT's own recipe: best 1.4672, in 142 s).
GPU_RECIPE = {
    "experiment": "nanogpt_shakespeare",
    "optimizer": "muon",
    "optimizer.lr": "1e-2",
    "trainer.max_steps": "1500",
}


def recipe_for_this_machine(argv: list[str]) -> list[str]:
    """Adds the recipe that suits this machine to a command that picks no model size (no model=, experiment=,
    debug= or hparams_search=): GPU_RECIPE on a CUDA GPU, CPU_RECIPE on a CPU (none on other accelerators). Each
    item shows in the run's name and .hydra/overrides.yaml like one typed by hand; a value of your own for the same
    key wins (and an optimizer= of your own keeps that optimizer's lr)."""
    given = dict(a.lstrip("+~").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    if given.keys() & {"model", "experiment", "debug", "hparams_search"}:
        return argv
    chosen = {"cuda": GPU_RECIPE, "cpu": CPU_RECIPE}.get(training_device_type(given.get("trainer.accelerator", "auto")))
    if chosen is None:
        return argv
    taken = set(given) | ({"optimizer.lr"} if "optimizer" in given else set())
    recipe = [f"{key}={v}" for key, v in chosen.items() if key not in taken]
    # before the first override of your own: Hydra's parser wants all overrides together (e.g. before a --cfg job)
    at = next((i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:at], *recipe, *argv[at:]]


def check_checkpoint(
    cfg: DictConfig, ckpt_path: str, config: TransformerConfig, datamodule, limits: dict
) -> str | None:
    """Refuses, before Lightning loads it, a checkpoint this run cannot go on from (damaged, another model or
    vocabulary, resume= on other data, no steps left); returns the line that says a run is fine-tuning, if it is."""
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
    if continuing:
        keep_resumed_settings(cfg, step)
    return note


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
    interval = cfg.trainer.val_check_interval
    if interval is not None and (not is_number(interval) or interval <= 0):
        raise ConfigError(
            f"trainer.val_check_interval={interval} must be a positive number of steps (or a fraction of an epoch)."
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training job; returns the final metrics (val/loss, val/bpc, ...)."""
    check_run_settings(cfg)
    ckpt_path = resume_checkpoint(cfg)  # fail fast on a bad resume= or ckpt_path=
    if cfg.malloc_reuse:
        retain_freed_memory()
    if threads := threads_per_job(cfg):
        torch.set_num_threads(threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    tokenizer = datamodule.tokenizer  # opens (and if needed downloads and encodes) the corpus

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    compile_model = model_cfg.pop("compile", False)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, **model_cfg)
    limits, clock = run_length(cfg)
    fine_tuning = check_checkpoint(cfg, ckpt_path, config, datamodule, limits) if ckpt_path else None
    schedule = {**OmegaConf.to_container(cfg.lr_schedule), "clock": clock}
    module = LanguageModel(config, tokenizer.vocab, optimizer=instantiate(cfg.optimizer), **schedule)
    module.build_optimizer()  # settings the optimizer refuses fail here, before loggers write anything

    trainer_cfg = cfg.trainer
    device_type = training_device_type(trainer_cfg.accelerator)
    if should_compile(compile_model, device_type):
        module.model.compile()  # in place: checkpoints keep the plain parameter names
    precision, note = resolve_precision(trainer_cfg.precision, device_type)
    if device_type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 products (Ampere and later): what Lightning advises
    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if module.model._compiled_call_impl is not None:  # nn.Module.compile's
        callbacks.append(CompileTime())
    if trainer_cfg.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        # the same bar for every install: Lightning takes Rich's whenever `rich` can be imported (optuna pulls it
        # in), and that one draws nothing until training ends when its output is a log file
        callbacks.append(ResumableProgressBar())
    try:
        trainer: L.Trainer = instantiate(
            trainer_cfg, **limits, precision=precision, logger=loggers or False, callbacks=callbacks
        )
    except InstantiationException as error:
        if isinstance(error.__cause__, MisconfigurationException):  # Lightning's word for a bad trainer.* value
            raise ConfigError(f"trainer: {error.__cause__}") from error
        raise

    if trainer.is_global_zero:
        if fine_tuning:
            print(f"[transformer-lm] {fine_tuning}", file=sys.stderr, flush=True)
        if warning := emulated_bf16_warning(precision, device_type):
            print(f"warning: {warning}", file=sys.stderr, flush=True)
        if clock == "time":
            length = f"a time budget of {limits['max_time']}"
        else:
            length = f"{limits['max_steps']} steps" if limits["max_steps"] > 0 else f"{trainer_cfg.max_epochs} epochs"
        print(
            f"[transformer-lm] {note}; {length} (learning rate follows the {clock} clock); "
            f"{config.n_layer} layers x {config.n_embd} wide, "
            f"{module.model.num_parameters() / 1e6:.2f}M parameters, vocabulary of {tokenizer.vocab_size}, "
            f"run dir {cfg.paths.run_dir}",
            file=sys.stderr,
            flush=True,
        )
    hparams = run_hparams(cfg, precision=precision, clock=clock, **limits)
    hparams["parameters"] = module.model.num_parameters()
    for logger in loggers:
        logger.log_hyperparams(hparams)

    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except torch.OutOfMemoryError as error:
        raise ConfigError(out_of_memory_advice(error, module, cfg)) from error
    fit_seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero and metrics:
        print(
            "[transformer-lm] final " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())),
            file=sys.stderr,
            flush=True,
        )
    if trainer.is_global_zero and not trainer.interrupted:
        evaluations, train_evaluations = evaluate_final_model(cfg, module, datamodule, precision)
        summary = {
            "status": "finished",
            "metrics": metrics,
            "global_step": trainer.global_step,
            "fit_seconds": fit_seconds,
            "tokens_per_step": datamodule.batch_size * datamodule.seq_length * trainer.world_size,
            # forward and backward, attention included (counted on a meta-device copy): the x axis of loss-vs-compute
            "flops_per_step": module.flops_per_batch * trainer.accumulate_grad_batches * trainer.world_size,
            "parameters": module.model.num_parameters(),
            "seq_length": config.seq_length,
            "threads": torch.get_num_threads(),
            "hparams": hparams,
            "evaluations": [r.to_dict() for r in evaluations],
            "train_evaluations": [r.to_dict() for r in train_evaluations],
        }
        if costs := [c for c in trainer.callbacks if isinstance(c, ValidationCost)]:
            summary["validation_seconds"] = costs[0].seconds
            summary["validations"] = costs[0].records
        write_atomically(
            Path(cfg.paths.run_dir) / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2))
        )
    return metrics


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
        hparams.update({g: choices.get(g) for g in ("model", "optimizer", "experiment") if g in choices})
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


def evaluate_final_model(cfg: DictConfig, module: LanguageModel, datamodule, precision: str) -> tuple[list, list]:
    """With `final_eval.context_multiples` (e.g. [1, 2, 4]), the final model's loss on the validation split at
    those multiples of the training context, and with `final_eval.train_split`, on the start of the training data
    it saw (as many characters as the validation split); written to <run dir>/final.eval.md and .json like
    evaluate.py's. Returns (validation results, training-data results)."""
    multiples = list(cfg.final_eval.context_multiples or [])
    if not all(is_count(m) for m in multiples):
        raise ConfigError(f"final_eval.context_multiples={multiples} must be positive integers, e.g. [1,2,4].")
    on_train = bool(cfg.final_eval.get("train_split", False))
    if not multiples and not on_train:
        return [], []
    seq_length, batch_size = module.config.seq_length, cfg.final_eval.batch_size
    dtype = torch.bfloat16 if "bf16" in precision else None
    val = datamodule.split("val")
    results = [evaluate(module.model, val, m * seq_length, batch_size, dtype) for m in multiples]
    tables = [f"Validation split:\n\n{results_table(results, seq_length)}"] if results else []
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
    }
    write_report(Path(cfg.paths.run_dir) / "final", report, table, "The final model")
    print(f"[transformer-lm] the final model:\n{table}", file=sys.stderr)
    return results, train_results


def sweep_job(cfg: DictConfig) -> dict[str, float]:
    """One job of a multirun: a failure is reported (an `error:` line, and summary.json with status "failed")
    and the sweep goes on with its other jobs; an Optuna search records the trial as failed."""
    try:
        return train(cfg)
    except Exception as error:
        if full_errors():
            traceback.print_exc()
        error = project_error(error) or error  # a config's own sentence, not Hydra's wrapping of it
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message} (in {cfg.paths.run_dir}; the sweep goes on)", file=sys.stderr, flush=True)
        summary = {"status": "failed", "error": message}
        write_atomically(Path(cfg.paths.run_dir) / "summary.json", lambda tmp: tmp.write_text(json.dumps(summary)))
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
    """Deletes `run_dir` if it holds only what Hydra writes at start (.hydra/, an empty train.log)."""
    log = run_dir / "train.log"
    if not run_dir.is_dir() or (log.is_file() and log.stat().st_size > 0):
        return
    if {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        metrics = sweep_job(cfg)
    else:
        metrics = report_errors(single_run)(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper optimises (None: a failed trial)


if __name__ == "__main__":
    sys.argv = recipe_for_this_machine(log_into_resumed_run(sys.argv))
    note_sweep_constants(sys.argv)
    main()
