"""Loading trained models from checkpoints, safely: tensors and plain data only, never pickled code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lm.errors import CheckpointError
from lm.model import Transformer, TransformerConfig
from lm.tokenizer import CharTokenizer

CHECKPOINT_KEY = "transformer_lm"  # where a checkpoint carries the model config, vocabulary and data info
CHECKPOINT_FORMAT = 1


def find_checkpoint(path: str | Path) -> Path:
    """`path` itself if it is a file; for a run directory, its best checkpoint (else its last one)."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        for candidate in ("checkpoints/best.ckpt", "best.ckpt", "checkpoints/last.ckpt", "last.ckpt"):
            if (path / candidate).is_file():
                return path / candidate
        raise CheckpointError(
            f"{path} holds no checkpoints/best.ckpt or checkpoints/last.ckpt; pass ckpt= a .ckpt file."
        )
    raise CheckpointError(f"The checkpoint {path} does not exist; pass ckpt= a .ckpt file or a run directory.")


def read_checkpoint(path: str | Path, map_location="cpu") -> tuple[dict, Path]:
    """The checkpoint's contents, loaded with `weights_only=True` (a file that would run code is refused)."""
    path = find_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} contains objects other than tensors and plain data, so it was not loaded (loading it could run "
            f"code); use a checkpoint written by this project. ({str(error).splitlines()[0]})"
        ) from None
    except (EOFError, RuntimeError, zipfile.BadZipFile, ValueError, OSError) as error:
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({error}); use an intact .ckpt file."
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of transformer-lm (it has no model config or vocabulary).")
    meta = checkpoint[CHECKPOINT_KEY]
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer transformer-lm (format {meta['format']}); upgrade.")
    return checkpoint, path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, CharTokenizer]:
    """Loads a trained model (in eval mode) and its tokenizer from a checkpoint file or run directory.

    >>> model, tokenizer = load_model("outputs/runs/<run>/")          # doctest: +SKIP
    """
    checkpoint, path = read_checkpoint(path, map_location=device)
    meta = checkpoint[CHECKPOINT_KEY]
    model = Transformer(TransformerConfig(**meta["model_config"]))
    prefix = "model."
    state = {
        key[len(prefix) :].replace("_orig_mod.", ""): value  # torch.compile wraps the model as _orig_mod
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own model config ({error}).") from None
    return model.to(device).eval(), CharTokenizer(meta["vocab"])
