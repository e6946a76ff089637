"""TensorBoard logging as this project wants it: an HParams tab that works, and no clutter in the scalar list."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.tensorboard.summary import hparams

# The HParams tab shows, for every run, the last value of each of these scalar series.
HPARAM_METRICS = ("val/loss", "val/bpc", "val/best_loss")

# TensorBoard's Custom Scalars tab: what compares runs first (Time Series and Scalars sort groups by name, which
# puts speed/ and train/ before val/). Each chart draws every run's series.
CUSTOM_SCALARS = {
    "validation: what compares runs": {
        "val/loss (nats)": ["Multiline", ["^val/loss$"]],
        "val/bpc (bits per character)": ["Multiline", ["^val/bpc$"]],
        "val/best_loss": ["Multiline", ["^val/best_loss$"]],
    },
    "training": {
        "train/loss": ["Multiline", ["^train/loss$"]],
        "train/lr": ["Multiline", ["^train/lr$"]],
        "train/grad_norm (before clipping)": ["Multiline", ["^train/grad_norm$"]],
    },
    "speed": {
        "speed/tokens_per_sec": ["Multiline", ["^speed/tokens_per_sec$"]],
        "speed/mfu": ["Multiline", ["^speed/mfu$"]],
    },
}


def flatten_hparams(params: Mapping[str, Any], prefix: str = "") -> dict[str, int | float | str | bool]:
    """Nested settings as one level of dotted keys with values TensorBoard can show (lists and None as text)."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_hparams(value, f"{name}."))
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's `TensorBoardLogger`, with three changes.

    - `log_hyperparams` writes the HParams plugin's data with `HPARAM_METRICS` declared as its metrics (Lightning
      writes none with `default_hp_metric=False` and no metrics), so TensorBoard's HParams tab lists every run
      with its settings and final `val/loss`, `val/bpc` and best `val/loss`, without logging placeholder values.
    - Lightning's `epoch` scalar, which it adds to every logging call, is dropped: these runs count steps.
    - With the hyperparameters, once per run, it writes the Custom Scalars layout (`CUSTOM_SCALARS`): validation
      first, then training, then speed.
    """

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(*args, **kwargs)

    @rank_zero_only
    def log_hyperparams(self, params, metrics=None, step=None) -> None:
        super().log_hyperparams(params, metrics, step)  # hparams.yaml
        if metrics is None:
            flat = flatten_hparams(params if isinstance(params, Mapping) else vars(params))
            writer = self.experiment._get_file_writer()
            for summary in hparams(flat, dict.fromkeys(HPARAM_METRICS, 0.0)):
                writer.add_summary(summary)
            self.experiment.add_custom_scalars(CUSTOM_SCALARS)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, step)


class CSVLogger(LightningCSVLogger):
    """Lightning's CSV logger, continued by a resumed run: Lightning's own writer deletes the metrics.csv it finds
    (warning that "previous log files ... will be deleted") and starts knowing no column; this one keeps the rows
    logged before and goes on under their header."""

    @property
    def experiment(self):
        if self._experiment is not None:
            return super().experiment
        path = Path(self.log_dir) / "metrics.csv"
        earlier = path.read_bytes() if path.is_file() else b""
        writer = super().experiment
        if earlier and isinstance(getattr(writer, "metrics_file_path", None), str):  # rank 0; others get a stand-in
            Path(writer.metrics_file_path).write_bytes(earlier)
            header = next(csv.reader(earlier.decode().splitlines()), [])
            writer.metrics_keys = sorted(set(writer.metrics_keys) | set(header))
        return writer
