"""Shared start-up for the scripts: the project root, Hydra resolvers, and user-facing error reporting."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(ROOT / "conf")
os.environ.setdefault("LM_PROJECT_ROOT", str(ROOT))
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from lm.errors import LMError  # noqa: E402

if not OmegaConf.has_resolver("lm_suffix"):
    # "_<overrides>" for run directory names, nothing when there are no overrides
    OmegaConf.register_new_resolver("lm_suffix", lambda s: f"_{s}" if s else "")


def full_errors() -> bool:
    return os.environ.get("LM_FULL_ERROR") == "1" or os.environ.get("HYDRA_FULL_ERROR") == "1"


def report_errors(fn: Callable) -> Callable:
    """Runs `fn`; a project error (`LMError`) prints as one line on stderr and exits with status 1.

    Set LM_FULL_ERROR=1 (or HYDRA_FULL_ERROR=1) to see the full traceback instead.
    """

    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LMError as error:
            if full_errors():
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(1)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper
