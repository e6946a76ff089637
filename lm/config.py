"""Where the configs live, the resolvers they use, and composing one in-process.

Importing this module registers the resolvers that `conf/` interpolates (`lm_suffix`, `lm_name`, `lm_div`), so
any code that composes a config, the command line's or a test's, finds them. Run directory names come from here:
`short_name` for a run, `job_name` for a sweep's job (docs/training.md, "What a run writes").
"""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")
# conf/paths reads it: runs and corpora land in the checkout's outputs/ and data/, whatever the working directory
os.environ.setdefault("LM_PROJECT_ROOT", str(PROJECT_ROOT))

MAX_NAME = 120  # file systems cap a path component at 255 bytes

# What a Hydra value may hold unquoted (its override grammar), so that a run directory can be passed back as
# ckpt=<dir> or resume=<dir>: letters and digits, `_-+.$%*@?|:`; '/' is left out (it would nest directories)
UNQUOTED = re.compile(r"[^A-Za-z0-9_\-+.$%*@?|:]")

# A sweep over values (a,b,c or range(...)); a list value ([1,2,4]) is one value
SWEEP_VALUE = re.compile(r"^(?!\[).*,|^(range|choice|interval|glob|tag|sort|shuffle)\(")
SWEEP_CONSTANTS = "LM_SWEEP_CONSTANTS"  # set for the sweep's jobs, which may run in other processes
RECIPE_KEYS = "LM_RECIPE_KEYS"  # the keys the machine's recipe added to the command line (lm/cli.py)


def short_name(overrides: str) -> str:
    """A run directory name from its overrides ("key-value+key-value"): what the command line said first, then
    what the machine's recipe added (RECIPE_KEYS); within each, config-group choices first (they say most about a
    run), then the rest. Where the name would be too long it is cut at an item's end, with a hash of the whole to
    stay unique. Characters a Hydra value cannot hold unquoted are dropped (quotes) or replaced: accents by the
    letter (é: e), the rest by _."""
    ascii_only = unicodedata.normalize("NFKD", overrides).encode("ascii", "ignore").decode()
    overrides = UNQUOTED.sub("_", ascii_only.replace("'", "").replace('"', ""))
    items = overrides.split("+") if overrides else []
    recipe = set(filter(None, os.environ.get(RECIPE_KEYS, "").split(",")))

    def order(item: str) -> tuple[bool, bool]:
        key = item.split("-", 1)[0]
        return key in recipe, "." in key

    items = sorted(items, key=order)
    name = "+".join(items)
    if len(name) <= MAX_NAME:
        return name
    kept = ""
    for item in items:  # whole items while they fit beside the hash
        if len(kept) + len(item) + 1 > MAX_NAME - 10:
            break
        kept = f"{kept}+{item}" if kept else item
    return f"{kept}..{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def note_sweep_constants(argv: Iterable[str]) -> None:
    """Records the keys that a multirun command line sets to one value for all its jobs, so that the jobs' directory
    names leave them out (`job_name`). Launchers that run jobs in other processes inherit the environment."""
    keys = []
    for arg in argv:
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


def register_resolvers() -> None:
    """Registers the resolvers `conf/` uses (once per process)."""
    if OmegaConf.has_resolver("lm_suffix"):
        return
    # "_<overrides>" for run directory names, nothing when there are no overrides
    OmegaConf.register_new_resolver("lm_suffix", lambda s: f"_{short_name(s)}" if s else "")
    OmegaConf.register_new_resolver("lm_name", job_name)
    OmegaConf.register_new_resolver("lm_div", tokens_per_row)


register_resolvers()


def compose_config(overrides: Iterable[str] = (), config_name: str = "train") -> DictConfig:
    """The config that `scripts/<config_name>.py <overrides>` would run with, composed in this process through
    Hydra's compose API; its Hydra node is made current (`HydraConfig`), so `${hydra:...}` values resolve.

    Hydra's compose API sets no run directory: give `paths.run_dir=<dir>` for a training run.
    """
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):  # as Hydra runs a job: its own node is HydraConfig's, not the job's
        del cfg["hydra"]
    return cfg
