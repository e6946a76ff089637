"""Where the configs live, the resolvers they use, and composing one in-process.

Importing this module registers the resolvers that `conf/` interpolates (`lm_suffix`, `lm_name`, `lm_div`,
`lm_new_dir`, `lm_config_subdir`, `lm_sweep_job`, `lm_mul`), so any code that composes a config, the command
line's or a test's, finds them.
The run directory names they make come from `lm.naming`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from lm.files import claim_directory
from lm.naming import job_name, short_name
from lm.sweep import config_subdir, sibling_checkpoint

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = str(PROJECT_ROOT / "conf")
# conf/paths reads it: runs and corpora land in the checkout's outputs/ and data/, whatever the working directory
os.environ.setdefault("LM_PROJECT_ROOT", str(PROJECT_ROOT))


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
    # a run's or a sweep's directory, created when first resolved: cached, so that the launcher's and each job's
    # copy of the config (Hydra copies the cache into them) name the same one
    OmegaConf.register_new_resolver("lm_new_dir", claim_directory, use_cache=True)
    OmegaConf.register_new_resolver("lm_config_subdir", config_subdir)
    # the checkpoint of another job of the same sweep (length_study's fine-tuned arms start from its rope arm's)
    OmegaConf.register_new_resolver("lm_sweep_job", sibling_checkpoint)
    OmegaConf.register_new_resolver("lm_mul", lambda a, b: int(a) * int(b))


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
