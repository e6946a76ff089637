"""The command line before Hydra parses it: the one place where the scripts' arguments are rewritten.

`command_line(script, argv)` is all a script calls. Three things need a word with Hydra before it composes:
`resume=<run dir>` brings that run's own overrides and directory, a training command that picks no model size
gets its machine's recipe (conf/recipes.yaml), generate.py's `prompt=` is quoted so it works as typed, and a model
setting given to generate.py or evaluate.py is refused in one line.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from omegaconf import OmegaConf

from lm.config import CONFIG_DIR
from lm.errors import ConfigError
from lm.hardware import resolve_precision, training_device_type
from lm.naming import RECIPE_KEYS, note_sweep_constants

RECIPES = Path(CONFIG_DIR) / "recipes.yaml"


def command_line(script: str, argv: list[str]) -> list[str]:
    """`argv` as Hydra should parse it for `script` (train, generate, evaluate, compare or export); `argv[0]` is kept.

    For train: `resume=` and the machine's recipe (see the module's docstring), and the keys a multirun sets to one
    value for all its jobs are recorded, so the jobs' directory names leave them out. For generate and evaluate: a
    model setting is refused (the checkpoint fixes the model), and generate's prompt is quoted.
    """
    if script == "train":
        refuse_a_used_directory(argv)
        typed = log_into_resumed_run(continue_sweep(argv))
        typed = run_dir_of_another_rank(typed)
        argv = recipe_for_this_machine(typed)
        # the recipe's items come after what the command said in run directory names (lm.config.short_name)
        os.environ[RECIPE_KEYS] = ",".join(override_key(a) for a in argv if a not in typed)
        note_sweep_constants(argv[1:])
    else:
        refuse_model_settings(script, argv)
        if script == "generate":
            argv = quote_prompt_argument(argv)
    return argv


# the training config groups that shape a model: a checkpoint fixes them, so generate.py and evaluate.py take none
MODEL_GROUPS = ("model", "pos_encoding", "variant")
# except RoPE's context extension, which a trained model takes without retraining (lm.model.Transformer.extend_context)
CONTEXT_EXTENSION = tuple(f"model.pos_encoding.{key}" for key in ("scaling", "scaling_factor", "original_length"))


def refuse_model_settings(script: str, argv: list[str]) -> None:
    """Exits with one line when generate.py or evaluate.py is given a model setting (`model.mlp=relu`,
    `pos_encoding=rope`, `+model.mlp=relu`): Hydra would print a multi-line struct error, or with `+` take the key
    and ignore it."""
    if script not in ("generate", "evaluate"):
        return
    for arg in argv[1:]:
        if arg.startswith("-") and not arg.startswith("~"):
            continue
        key = override_key(arg)
        if key.split(".", 1)[0] in MODEL_GROUPS and not (key in CONTEXT_EXTENSION and not arg.startswith(("+", "~"))):
            print(
                f"error: {arg}: the model's settings come from its checkpoint, so {script}.py cannot change them "
                f"(only RoPE's context extension: {', '.join(k + '=' for k in CONTEXT_EXTENSION)}); set them when "
                "training (scripts/train.py), or fine-tune a new run from the checkpoint with "
                "scripts/train.py ckpt_path=<checkpoint> and the settings it takes.",
                file=sys.stderr,
            )
            sys.exit(1)


def override_key(override: str) -> str:
    """`model` for `model=tiny`, `trainer.max_steps` for `+trainer.max_steps=5`."""
    return override.split("=", 1)[0].lstrip("+~")


def insert_overrides(argv: list[str], overrides: list[str]) -> list[str]:
    """`overrides` placed before the command's first override: Hydra's parser wants all overrides together (a flag
    such as `--cfg job` may follow them)."""
    at = next((i for i, a in enumerate(argv) if i > 0 and "=" in a and not a.startswith("-")), len(argv))
    return [*argv[:at], *overrides, *argv[at:]]


def log_into_resumed_run(argv: list[str]) -> list[str]:
    """`resume=<run dir>` continues that run with its own settings, in its directory, so its logs and checkpoints
    stay in one place: the run's overrides (.hydra/overrides.yaml) come first, then the command's, which win. Hydra
    does not write its .hydra/ files there (they would replace the run's own before the resume is checked): the run
    keeps the resumed run's settings beside them once the checkpoint is accepted."""
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or any(a.startswith("hydra.run.dir=") for a in argv):
        return argv
    run_dir = Path(resume[-1].rstrip("/"))
    if not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return argv  # not a run: the run says so, and no directory gets created at that path
    given = {override_key(a) for a in argv[1:] if "=" in a and not a.startswith("-")}
    previous = []
    if (overrides := run_dir / ".hydra" / "overrides.yaml").is_file():
        previous = [
            o
            for o in OmegaConf.to_container(OmegaConf.load(overrides))
            if override_key(o) not in given and not override_key(o).startswith(("hydra.", "paths.", "resume", "ckpt_"))
        ]
    return [*insert_overrides(argv, previous), f"hydra.run.dir={run_dir}", "hydra.output_subdir=null"]


def continue_sweep(argv: list[str]) -> list[str]:
    """`resume=<sweep dir>` continues that sweep (or study) in its directory, as a multirun of its own overrides (its
    multirun.yaml: the task's and Hydra's, e.g. the launcher), then the command's, which win. Each job then decides
    for itself (lm.train.sweep_job): kept, continued from its last.ckpt, or run from the start. Hydra writes no
    settings into a job kept or continued (the `lm_config_subdir` resolver): its .hydra/ stays as it started."""
    resume = [a.split("=", 1)[1] for a in argv if a.startswith("resume=")]
    if not resume or not (Path(resume[-1]) / "multirun.yaml").is_file():
        return argv
    sweep_dir = Path(resume[-1].rstrip("/"))
    saved = OmegaConf.to_container(OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides)  # not resolved
    given = {override_key(a) for a in argv[1:] if "=" in a and not a.startswith("-")}
    ours = ("resume", "hydra.sweep.dir", "hydra.output_subdir", "hydra.mode")
    previous = [o for o in [*saved["hydra"], *saved["task"]] if override_key(o) not in given | set(ours)]
    flags = [] if {"-m", "--multirun"} & set(argv) else ["-m"]
    continued = [f"hydra.sweep.dir={sweep_dir}", "hydra.output_subdir=${lm_config_subdir:}"]
    return [argv[0], *flags, *insert_overrides(argv, previous)[1:], *continued]


def launch_rank() -> int:
    """This process's rank in a run started by several processes at once, from what their launcher sets: torchrun
    (RANK), SLURM's srun (SLURM_PROCID, with more than one task), or one `python scripts/train.py` per node with
    Lightning's own launcher (NODE_RANK: the first process of each node); 0 otherwise."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("NODE_RANK", "0"))


def run_dir_of_another_rank(argv: list[str]) -> list[str]:
    """Only rank 0 makes the run's directory. Every other rank (another node, or another process of torchrun or
    srun) gets a private temporary one for what Hydra writes at start, removed when it exits, and takes rank 0's
    directory once the processes meet (lm.callbacks.LatestCheckpoint, Lightning's ModelCheckpoint); what the run
    writes, only rank 0 writes. A command that names its directory (resume=, hydra.run.dir=, as Lightning's
    launcher does for the processes it starts) keeps it on every rank."""
    if launch_rank() == 0 or any(a.startswith("hydra.run.dir=") for a in argv) or {"-m", "--multirun"} & set(argv):
        return argv  # (a sweep's jobs are one process each)
    private = tempfile.mkdtemp(prefix=f"transformer-lm-rank{launch_rank()}-")
    atexit.register(shutil.rmtree, private, ignore_errors=True)
    return [*argv, f"hydra.run.dir={private}", "hydra.output_subdir=null"]


def refuse_a_used_directory(argv: list[str]) -> None:
    """A run directory that holds a run, or a sweep directory that holds a sweep, is only ever reused by resume=:
    anything else would write a second run over the first (its checkpoints, logs and summary.json)."""
    if any(a.startswith("resume=") for a in argv):
        return
    for arg in argv[1:]:
        key, _, value = arg.partition("=")
        value = value.strip("'\"")
        if key == "hydra.run.dir" and not any(a.startswith("hydra.job.name=train_ddp_process_") for a in argv):
            held = [n for n in ("checkpoints", "summary.json", ".hydra") if (Path(value) / n).exists()]
        elif key == "hydra.sweep.dir":
            held = [n for n in ("multirun.yaml",) if (Path(value) / n).exists()]
        else:
            continue
        if held:
            what = "run" if key == "hydra.run.dir" else "sweep"
            print(
                f"error: {key}={value} holds a {what} already ({held[0]}); continue it with resume={value}, or pick "
                "a new directory.",
                file=sys.stderr,
            )
            sys.exit(1)


def machine_recipes() -> dict[str, dict[str, str]]:
    """conf/recipes.yaml: the overrides for each kind of machine ("cpu", "cpu_fp32", "cuda")."""
    return OmegaConf.to_container(OmegaConf.load(RECIPES))


def recipe_kind(device_type: str, precision: str | None) -> str:
    """Which recipe a run on `device_type` at `precision` (as typed; None or "auto" for the machine's choice) takes:
    "cpu_fp32" for a CPU that trains in fp32 (no native bf16, bf16 no faster than fp32, or trainer.precision=32-true),
    which makes a fraction of the steps a bf16 CPU makes in the same five minutes; else the device type."""
    try:
        if device_type == "cpu" and resolve_precision(precision, "cpu")[0].startswith("32"):
            return "cpu_fp32"
    except ConfigError:  # a precision a CPU cannot take: the run's own checks say so, in one line
        pass
    return device_type


def recipe_for_this_machine(argv: list[str]) -> list[str]:
    """Adds the recipe that suits this machine (conf/recipes.yaml) to a command that picks no model size (no
    model=, experiment=, variant=, debug= or hparams_search=): the cuda one on a CUDA GPU, on a CPU the cpu one, or
    cpu_fp32 where the run trains in fp32 (`recipe_kind`), none on other accelerators. A value of your own for the
    same key wins, and an optimizer= of your own keeps that optimizer's lr."""
    given = dict(a.lstrip("+~").split("=", 1) for a in argv[1:] if "=" in a and not a.startswith("-"))
    if given.keys() & {"model", "experiment", "variant", "debug", "hparams_search"}:
        return argv
    device_type = training_device_type(given.get("trainer.accelerator", "auto"))
    chosen = machine_recipes().get(recipe_kind(device_type, given.get("trainer.precision")))
    if chosen is None:
        return argv
    taken = set(given) | ({"optimizer.lr"} if "optimizer" in given else set())
    return insert_overrides(argv, [f"{key}={value}" for key, value in chosen.items() if key not in taken])


def quote_prompt_argument(argv: list[str]) -> list[str]:
    """Quotes `prompt=...` for Hydra, so prompts with characters its override grammar reserves ('!', ',', ...)
    work exactly as typed: prompt="KING: Oh God !"."""

    def quote(arg: str) -> str:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "prompt" or value[:1] in ("'", '"'):
            return arg
        value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
        return f"{key}='{value}'"

    return [quote(a) for a in argv]
