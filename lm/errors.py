"""Exception types whose messages are written for the user.

The scripts print these as one sentence and exit non-zero; anything else is a bug and keeps its traceback.
"""


class LMError(Exception):
    """Base class for problems a user can fix (bad input, bad config, missing files)."""


class ConfigError(LMError):
    """A configuration value is invalid."""


class DataError(LMError):
    """The corpus is missing, unreadable, or too small for the requested setup."""


class CheckpointError(LMError):
    """A checkpoint is missing, damaged, or not from this project."""


class TrainingDivergedError(LMError):
    """The training loss became NaN or infinite."""


def is_count(value, minimum: int = 1) -> bool:
    """Whether `value` is an integer of at least `minimum`. YAML's true and false load as Python bools, which are
    ints: without the bool check, `past_context=true` would mean one character."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value) -> bool:
    """Whether `value` is an int or a float, and not a bool (see `is_count`) or a string."""
    return isinstance(value, int | float) and not isinstance(value, bool)
