"""Train a character-level Transformer LM. Configuration: conf/train.yaml (see README for the groups).

python scripts/train.py                                   # defaults: Tiny Shakespeare, model=small
python scripts/train.py pos_encoding=rope optimizer=adafactor
python scripts/train.py -m pos_encoding=learned,sinusoidal,rope
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import hydra
import lightning as L
from _common import CONFIG_DIR, report_errors
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lm.errors import ConfigError
from lm.hardware import resolve_precision, retain_freed_memory, training_device_type
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
    """`resume=<run dir>` continues in that run's directory, so its logs and checkpoints stay in one place."""
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    run_dir = Path(resume[-1].rstrip("/"))
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return argv  # not a run: train() says so, and no directory gets created at that path
    return [*argv, f"hydra.run.dir={run_dir}"]


@report_errors
def train(cfg: DictConfig) -> dict[str, float]:
    """Runs one training job; returns the final metrics (val/loss, val/bpc, ...)."""
    ckpt_path = resume_checkpoint(cfg)  # fail fast on a bad resume= or ckpt_path=
    if cfg.malloc_reuse:
        retain_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    tokenizer = datamodule.tokenizer  # opens (and if needed downloads and encodes) the corpus

    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    compile_model = model_cfg.pop("compile", False)
    config = TransformerConfig(vocab_size=tokenizer.vocab_size, **model_cfg)
    module = LanguageModel(config, tokenizer.vocab, optimizer=instantiate(cfg.optimizer), **cfg.lr_schedule)
    if compile_model:
        module.model.compile()  # in place: checkpoints keep the plain parameter names

    trainer_cfg = cfg.trainer
    precision, note = resolve_precision(trainer_cfg.precision, training_device_type(trainer_cfg.accelerator))
    loggers = build_loggers(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer: L.Trainer = instantiate(trainer_cfg, precision=precision, logger=loggers or False, callbacks=callbacks)

    if trainer.is_global_zero:
        print(
            f"[transformer-lm] {note}; {config.n_layer} layers x {config.n_embd} wide, "
            f"{module.model.num_parameters() / 1e6:.2f}M parameters, vocabulary of {tokenizer.vocab_size}, "
            f"run dir {cfg.paths.run_dir}",
            file=sys.stderr,
            flush=True,
        )
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["trainer"]["precision"] = precision
    for logger in loggers:
        logger.log_hyperparams(hparams)

    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    if trainer.is_global_zero and metrics:
        print(
            "[transformer-lm] final " + "  ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())),
            file=sys.stderr,
            flush=True,
        )
    return metrics


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # the value a Hydra sweeper would optimise


if __name__ == "__main__":
    sys.argv = log_into_resumed_run(sys.argv)
    main()
