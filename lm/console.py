"""What the commands print: one `error:` line for a project error, and no library notices a user cannot act on.

Importing this module installs the notice filters below (once per process, and the test suite again for each test):
every command and every test that runs the package's commands sees the same console.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable

from hydra.errors import InstantiationException
from omegaconf.errors import MissingMandatoryValue

from lm.errors import ConfigError, LMError


def quiet_library_warnings() -> None:
    """Installs the warning filters for library notices a user of this project cannot act on. Called when this
    module is imported; the test suite calls it again for each test, as pytest resets the filters around every test."""
    # Printed at every run: Lightning's caution that an IterableDataset with __len__ may miscount under worker
    # processes (ours load batches in the main process), that a run resumed mid-epoch may not see the data it would
    # have (ours draws batch i as a function of the step: exact resume is tested), its deprecation warning about its
    # own use of torch's pytree; and under DDP its advice to log val/* and step with sync_dist=True (val/* come from
    # a metric already reduced across processes, and the step is the same on every one: reducing again would cost
    # collectives for the same value).
    warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")
    warnings.filterwarnings("ignore", message=r"It is recommended to use `self.log\('(val/|step)")
    warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch ended")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    # On resume, that the run's checkpoint folder holds checkpoints (it is meant to: the run goes on there) and that
    # its CSV log will be deleted (lm.loggers.CSVLogger keeps it and goes on writing it); on a small
    # corpus, that an epoch has fewer batches than the logging interval (logging counts steps across epochs here).
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the logging")


quiet_library_warnings()


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
    "Restoring states from the checkpoint",  # on resume: our own line says what is resumed, and from which step
    "Restored all states from the checkpoint",
)
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
    logging.getLogger(_name).addFilter(lambda record: not str(record.msg).startswith(LIGHTNING_NOTICES))


def full_errors() -> bool:
    """True when LM_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) asks for tracebacks instead of one error line."""
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
    if isinstance(error, MissingMandatoryValue):  # a `???` in conf/ that the command line did not fill
        return missing_value_error(error)
    return error if isinstance(error, LMError) else None


# What to pass for each value a command needs (`???` in conf/)
REQUIRED_VALUES = {
    "ckpt": "a run directory or a .ckpt file, e.g. ckpt=outputs/runs/<run>/",
    "out": "a new directory for the exported model, e.g. out=exported",
}


def missing_value_error(error: MissingMandatoryValue) -> ConfigError:
    """One sentence for a required value the command line left out: which, and what to pass."""
    key = error.full_key or str(error).rsplit(":", 1)[-1].strip()
    what = REQUIRED_VALUES.get(key, f"{key}=<value> on the command line")
    return ConfigError(f"{key}= is required; pass {what}.")


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
