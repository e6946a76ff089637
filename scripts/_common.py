"""Shared start-up for the scripts: the project root, Hydra resolvers, and user-facing error reporting."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
os.environ.setdefault("LM_PROJECT_ROOT", str(ROOT))
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))
# Launchers that run jobs in fresh processes (submitit, locally or on SLURM) unpickle the job function there, and it
# imports this module: they must find scripts/ and the project as this process does.
_paths = [str(ROOT / "scripts"), str(ROOT)]
os.environ["PYTHONPATH"] = os.pathsep.join(
    dict.fromkeys(_paths + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
)

from hydra.errors import InstantiationException  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from lm.errors import LMError  # noqa: E402

# Library notices a user of this project cannot act on, printed at every run: Lightning's caution that an
# IterableDataset with __len__ may miscount under worker processes (ours load batches in the main process), that a
# run resumed mid-epoch may not see the data it would have (ours draws batch i as a function of the step: exact
# resume is tested), its deprecation warning about its own use of torch's pytree, and its advertisement for a cloud
# logger; and under DDP its advice to log val/* with sync_dist=True (they come from a metric already reduced across
# processes: reducing again would cost collectives for the same value).
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('val/")
warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# Lightning's start-up lines that our own start line already says better (device, precision) or that concern
# hardware a run does not use (TPUs, HPUs), and its advertisement for a cloud logger.
LIGHTNING_NOTICES = (
    "💡 Tip",
    "GPU available:",
    "TPU available:",
    "HPU available:",
    "LOCAL_RANK:",
    "Using bfloat16 Automatic Mixed Precision",
    "Using 16bit Automatic Mixed Precision",
    "Using default `ModelCheckpoint`",
)
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).addFilter(lambda record: not str(record.msg).startswith(LIGHTNING_NOTICES))

MAX_NAME = 120  # file systems cap a path component at 255 bytes


# What a Hydra value may hold unquoted (its override grammar), so that a run directory can be passed back as
# ckpt=<dir> or resume=<dir>: letters and digits, `_-+.$%*@?|:`; '/' is left out (it would nest directories)
UNQUOTED = re.compile(r"[^A-Za-z0-9_\-+.$%*@?|:]")


def short_name(overrides: str) -> str:
    """A run directory name from its overrides ("key-value+key-value"): config-group choices first (they say
    most about a run), then the rest; cut, with a hash to stay unique, where it would be too long. Characters a
    Hydra value cannot hold unquoted are dropped (quotes) or replaced: accents by the letter (é: e), the rest by _."""
    ascii_only = unicodedata.normalize("NFKD", overrides).encode("ascii", "ignore").decode()
    overrides = UNQUOTED.sub("_", ascii_only.replace("'", "").replace('"', ""))
    items = overrides.split("+") if overrides else []
    name = "+".join(sorted(items, key=lambda item: "." in item.split("-", 1)[0]))
    if len(name) <= MAX_NAME:
        return name
    return f"{name[: MAX_NAME - 10]}..{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# A sweep over values (a,b,c or range(...)); a list value ([1,2,4]) is one value
SWEEP_VALUE = re.compile(r"^(?!\[).*,|^(range|choice|interval|glob|tag|sort|shuffle)\(")
SWEEP_CONSTANTS = "LM_SWEEP_CONSTANTS"  # set by train.py for the sweep's jobs, which may run in other processes


def note_sweep_constants(argv: list[str]) -> None:
    """Records the keys that a multirun command line sets to one value for all its jobs, so that the jobs' directory
    names leave them out (`job_name`). Launchers that run jobs in other processes inherit the environment."""
    keys = []
    for arg in argv[1:]:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        if not SWEEP_VALUE.search(value):
            keys.append(key.lstrip("+~"))
    os.environ[SWEEP_CONSTANTS] = ",".join(keys)


def job_name(overrides: str) -> str:
    """A sweep job's directory name: only the overrides that differ between the sweep's jobs (the full list stays
    in its .hydra/overrides.yaml), so TensorBoard's run list shows what each run is."""
    constants = set(filter(None, os.environ.get(SWEEP_CONSTANTS, "").split(",")))
    items = overrides.split("+") if overrides else []
    varying = [item for item in items if item.split("-", 1)[0] not in constants]
    return short_name("+".join(varying or items))


def tokens_per_row(tokens: int, seq_length: int) -> int:
    """Rows of `seq_length` in `tokens` characters (at least one): the studies' batch size, so that a study can
    vary the context and keep the characters per step (context_study)."""
    return max(1, int(tokens) // int(seq_length))


if not OmegaConf.has_resolver("lm_suffix"):
    # "_<overrides>" for run directory names, nothing when there are no overrides
    OmegaConf.register_new_resolver("lm_suffix", lambda s: f"_{short_name(s)}" if s else "")
    OmegaConf.register_new_resolver("lm_name", job_name)
    OmegaConf.register_new_resolver("lm_div", tokens_per_row)


def full_errors() -> bool:
    return os.environ.get("LM_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def close_progress_bars() -> None:
    """Closes any open tqdm bar now: left to the interpreter's exit, its last redraw lands after our error line."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()


def project_error(error: BaseException) -> LMError | None:
    """The project error behind `error`: itself, or what a config's target raised inside `hydra.utils.instantiate`
    (which re-raises it wrapped in an InstantiationException, with Hydra's own lines around it); else None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, LMError) else None


def report_errors(fn: Callable) -> Callable:
    """Runs `fn`; a project error (`LMError`) prints as one line on stderr, the last thing the run prints, and
    exits with status 1. A closed stdout (the reader of a pipe quit) ends the run quietly with status 141.

    Set LM_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) to see the full traceback instead.
    """

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            # whoever read stdout stopped (`generate.py ... | head`): stop quietly, as Unix tools do, with their
            # status (128 + SIGPIPE); stdout goes to /dev/null so that the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(141)
        except Exception as error:
            user_error = project_error(error)
            if user_error is None or full_errors():
                raise
            close_progress_bars()
            sys.stdout.flush()
            if not getattr(user_error, "quiet", False):  # (said once, by rank 0, when all processes stop alike)
                print(f"error: {user_error}", file=sys.stderr, flush=True)
            sys.exit(getattr(user_error, "exit_code", 1))

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def resolve_device(name: str) -> str:
    """'auto' is CUDA when PyTorch sees a GPU, else the CPU; asking for a missing GPU is a clear error."""
    import torch

    from lm.errors import ConfigError

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name} was asked for, but PyTorch sees no CUDA GPU; use device=cpu or device=auto.")
    return name
