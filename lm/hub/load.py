"""Reading an exported directory back as transformer-lm weights: load_model, generate.py, evaluate.py and
train.py init_from= take one. Needs `safetensors` only, not `transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lm.errors import CheckpointError
from lm.model import TransformerConfig

EXPORT_META = "transformer_lm.json"  # beside config.json: what the export came from, in transformer-lm's terms
EXPORT_FORMAT = 1
CUSTOM = "transformer_lm"  # the family name of an export as custom code


def is_export(path: Path) -> bool:
    """Whether `path` is a directory written by `lm.hub.export`."""
    return path.is_dir() and (path / EXPORT_META).is_file()


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an export's safetensors file, or of its shards."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(
            f"{path} is an exported model, and reading it needs the safetensors package; install it with "
            'pip install -e ".[hf]".'
        ) from None
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    weights = {}
    for name in files:
        if not (path / name).is_file():
            raise CheckpointError(f"{path} has no {name}: the export is incomplete; export the checkpoint again.")
        weights |= load_file(path / name)
    return weights


def read_export(path: Path) -> dict:
    """An exported directory as a checkpoint-like dict: the model config, vocabulary and data info under
    "transformer_lm", the `Transformer`'s weights under "state_dict" ("model." keys), and "exported": True."""
    from lm.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_KEY  # here: lm.checkpoint imports this module
    from lm.hub.families import family_named

    try:
        meta = json.loads((path / EXPORT_META).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / EXPORT_META} is unreadable ({error}); export the checkpoint again.") from None
    if meta.get("format", 0) > EXPORT_FORMAT:
        raise CheckpointError(f"{path} was exported by a newer transformer-lm (format {meta['format']}); upgrade.")
    config = TransformerConfig(**meta["model_config"])
    weights = read_weights(path)
    try:
        if meta["family"] == CUSTOM:
            state = {key.removeprefix("model."): value for key, value in weights.items()}
            if config.tie_embeddings:
                state["head.weight"] = state["token_embedding.weight"]
        else:
            state = family_named(meta["family"]).from_hf(config, weights)
    except KeyError as error:
        raise CheckpointError(
            f"{path}'s weights lack {error}: the export is damaged; export the checkpoint again."
        ) from None
    return {
        CHECKPOINT_KEY: {key: meta[key] for key in ("model_config", "vocab", "data")} | {"format": CHECKPOINT_FORMAT},
        "state_dict": {f"model.{key}": value.float() for key, value in state.items()},
        "global_step": meta.get("global_step", 0),
        "exported": True,
    }
