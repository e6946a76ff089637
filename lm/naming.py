"""Run directory names: `short_name` for a run, `job_name` for a sweep's job, both made from the overrides
(docs/training.md, "What a run writes"); `readable_numbers` shortens long decimals there and in reports."""

from __future__ import annotations

import hashlib
import os
import re
import unicodedata
from collections.abc import Iterable

MAX_NAME = 120  # file systems cap a path component at 255 bytes

# What a Hydra value may hold unquoted (its override grammar), so that a run directory can be passed back as
# ckpt=<dir> or resume=<dir>: letters and digits, `_-+.$%*@?|:`; '/' is left out (it would nest directories)
UNQUOTED = re.compile(r"[^A-Za-z0-9_\-+.$%*@?|:]")

# A sweep over values (a,b,c or range(...)); a list value ([1,2,4]) is one value
SWEEP_VALUE = re.compile(r"^(?!\[).*,|^(range|choice|interval|glob|tag|sort|shuffle)\(")
SWEEP_CONSTANTS = "LM_SWEEP_CONSTANTS"  # set for the sweep's jobs, which may run in other processes
RECIPE_KEYS = "LM_RECIPE_KEYS"  # the keys the machine's recipe added to the command line (lm/cli.py)


# A decimal number in a name or a table (a sampled hyperparameter, say)
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+(?:e[-+]?\d+)?(?![\w.])")


def readable_numbers(text: str, digits: int = 4) -> str:
    """`text` with each decimal number of more than `digits` significant digits written with `digits` of them
    (an Optuna trial's `optimizer.lr=0.0006239607360308387` reads `optimizer.lr=0.000624`); the full value stays
    in the run's .hydra/overrides.yaml."""

    def shorten(match: re.Match) -> str:
        mantissa = match.group().split("e")[0].replace(".", "").lstrip("0").rstrip("0")
        return f"{float(match.group()):.{digits}g}" if len(mantissa) > digits else match.group()

    return DECIMAL.sub(shorten, text)


# after the config-group choices, the keys that change what is trained come first in a name that must be cut
NAME_PRIORITY = ("model.", "optimizer.", "data.", "lr_schedule.", "trainer.")


def name_priority(key: str) -> int:
    """Where an override's key stands in a run name: a config-group choice (`model`, `pos_encoding`) first, then
    model settings, the optimizer's, the data's, the schedule's, the trainer's, and the rest (callbacks, ...)."""
    if "." not in key:
        return 0
    return next((i + 1 for i, prefix in enumerate(NAME_PRIORITY) if key.startswith(prefix)), len(NAME_PRIORITY) + 1)


def short_name(overrides: str) -> str:
    """A run directory name from its overrides ("key-value+key-value"): what the command line said first, then
    what the machine's recipe added (RECIPE_KEYS); within each, config-group choices first (they say most about a
    run), then model, optimizer, data, schedule and trainer settings, then the rest (`name_priority`); long
    decimals with four significant digits (`readable_numbers`). Where the name would be too long it is cut at an
    item's end, with a hash of the whole to stay unique. Characters a Hydra value cannot hold unquoted are dropped
    (quotes) or replaced: accents by the letter (é: e), the rest by _."""
    ascii_only = unicodedata.normalize("NFKD", readable_numbers(overrides)).encode("ascii", "ignore").decode()
    overrides = UNQUOTED.sub("_", ascii_only.replace("'", "").replace('"', ""))
    items = [item for item in overrides.split("+") if item]  # (an appended key, +key=v, reads "+key-v")
    recipe = set(filter(None, os.environ.get(RECIPE_KEYS, "").split(",")))

    def order(item: str) -> tuple[bool, int]:
        key = item.split("-", 1)[0]
        return key in recipe, name_priority(key)

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
    items = [item for item in overrides.split("+") if item]
    varying = [item for item in items if item.split("-", 1)[0] not in constants]
    return short_name("+".join(varying or items))
