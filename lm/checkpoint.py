"""Loading trained models from checkpoints, safely: tensors and plain data only, never pickled code."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from lm.errors import CheckpointError
from lm.hub.load import is_export, read_export
from lm.model import Transformer, TransformerConfig
from lm.tokenizer import CharTokenizer

CHECKPOINT_KEY = "transformer_lm"  # where a checkpoint carries the model config, vocabulary and data info
CHECKPOINT_FORMAT = 1


COMMAND_LINE = "pass ckpt= a .ckpt file or a run directory"  # what a missing checkpoint's error asks for


def find_checkpoint(path: str | Path, fix: str = COMMAND_LINE) -> Path:
    """`path` itself if it is a file or an exported model (lm.hub.export); for a run directory, its best checkpoint
    (else its last one). Where there is none, a CheckpointError ending with `fix`, what the caller should do
    instead."""
    path = Path(path).expanduser()
    if path.is_file() or is_export(path):
        return path
    if path.is_dir():
        for candidate in ("checkpoints/best.ckpt", "best.ckpt", "checkpoints/last.ckpt", "last.ckpt"):
            if (path / candidate).is_file():
                return path / candidate
        raise CheckpointError(f"{path} holds no checkpoints/best.ckpt or checkpoints/last.ckpt; {fix}.")
    raise CheckpointError(f"The checkpoint {path} does not exist; {fix}.")


def read_checkpoint(path: str | Path, map_location="cpu", fix: str = COMMAND_LINE) -> tuple[dict, Path]:
    """The checkpoint's contents, loaded with `weights_only=True` (a file that would run code is refused), and the
    file they came from (`find_checkpoint(path, fix)`). An exported model's directory reads as a checkpoint of its
    weights alone, marked "exported" (`lm.hub.load.read_export`)."""
    path = find_checkpoint(path, fix)
    if is_export(path):
        return read_export(path), path
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a cut-off one has lost its directory
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint (not a whole zip archive); use an intact .ckpt file."
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} contains objects other than tensors and plain data, so it was not loaded (loading it could run "
            f"code); use a checkpoint written by this project. ({str(error).splitlines()[0]})"
        ) from None
    except Exception as error:  # EOFError, zipfile's, a KeyError from the legacy format's reader on any other file
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(error).__name__}: {error}); "
            "use an intact .ckpt file."
        ) from None
    if not isinstance(checkpoint, dict) or CHECKPOINT_KEY not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint of transformer-lm (it has no model config or vocabulary).")
    meta = checkpoint[CHECKPOINT_KEY]
    if meta.get("format", 0) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} was written by a newer transformer-lm (format {meta['format']}); upgrade.")
    return checkpoint, path


def load_model(
    path: str | Path, device: str | torch.device = "cpu", rope_scaling: dict | None = None
) -> tuple[Transformer, CharTokenizer]:
    """Loads a trained model (in eval mode) and its tokenizer from a checkpoint file, a run directory, or a
    directory written by scripts/export.py.

    `rope_scaling` applies a RoPE context extension to it without retraining: {"scaling": "yarn", "scaling_factor":
    4.0, "original_length": 128}; a None or missing value keeps the checkpoint's.

    >>> model, tokenizer = load_model("outputs/runs/<run>/")          # doctest: +SKIP
    """
    checkpoint, path = read_checkpoint(
        path, map_location=device, fix="give load_model a .ckpt file, a run directory or an export"
    )
    meta = checkpoint[CHECKPOINT_KEY]
    model = Transformer(TransformerConfig(**meta["model_config"]))
    if rope_scaling and any(value is not None for value in rope_scaling.values()):
        pe = model.config.pos_encoding
        model.extend_context(
            rope_scaling.get("scaling") or pe.scaling,
            rope_scaling.get("scaling_factor") or pe.scaling_factor,
            rope_scaling.get("original_length") or pe.original_length,
        )
    try:
        model.load_state_dict(model_state(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own model config ({error}).") from None
    byte_level = (meta.get("data") or {}).get("encoding") == "bytes"  # trained on a byte corpus (enwik8)
    return model.to(device).eval(), CharTokenizer(meta["vocab"], byte_level=byte_level)


def model_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The `Transformer`'s state dict inside a Lightning checkpoint of `LanguageModel`."""
    prefix = "model."
    return {
        key[len(prefix) :].replace("_orig_mod.", ""): value  # torch.compile wraps the model as _orig_mod
        for key, value in checkpoint["state_dict"].items()
        if key.startswith(prefix)
    }


def _model_settings(config: dict) -> dict[str, object]:
    """A model config as the overrides that set it (model.n_layer=6, pos_encoding=rope, ...). Dropout and the
    initialisation are left out: they shape neither the weights nor what they mean, so a resumed run may change them."""
    settings = {}
    for key, value in config.items():
        if key in ("dropout", "init", "vocab_size"):
            continue
        if key == "pos_encoding":
            settings["pos_encoding"] = value["name"]
            if value["name"] in ("rope", "xpos"):
                settings["model.pos_encoding.base"] = value["base"]
            if value["name"] == "rope":  # its context extension (scaling) may change: it shapes no weight
                settings["model.pos_encoding.rotary_fraction"] = value["rotary_fraction"]
        elif key == "seq_length":
            settings["data.seq_length"] = value
        else:
            settings[f"model.{key}"] = value
    return settings


def as_override(key: str, value) -> str:
    """`key=value` as a Hydra command line takes it: true/false and null, not Python's True and None."""
    if isinstance(value, bool):
        shown = str(value).lower()
    elif value is None:
        shown = "null"
    else:
        shown = str(value)
    return f"{key}={shown}"


def _show_characters(chars: str) -> str:
    return repr("".join(sorted(chars)))


def check_resumable(
    checkpoint: dict,
    path: Path,
    config: TransformerConfig,
    vocab: str,
    corpus_sha256: str | None,
    continuing: bool,
    weights_only: bool = False,
) -> str | None:
    """Checks, before Lightning loads `checkpoint`, that this run can go on from it; raises a `CheckpointError`
    naming both values and the fix when it cannot.

    The model settings and the vocabulary must match. `continuing` (resume=<run dir>) also requires the same
    corpus: continuing a run is on its own data. Otherwise (ckpt_path= into a new run) another corpus with the
    same vocabulary is fine-tuning: the returned line says so (None when the corpus is the same). `weights_only`
    (init_from=): a new run starts from the weights alone, with an optimizer and schedule of its own; the returned
    line says so.
    """
    meta = checkpoint[CHECKPOINT_KEY]
    option = (
        f"resume={path.parent.parent}" if continuing else f"init_from={path}" if weights_only else f"ckpt_path={path}"
    )
    # through TransformerConfig: a checkpoint written before an option existed reads that option's default
    theirs = _model_settings(TransformerConfig(**meta["model_config"]).to_dict())
    ours = _model_settings(config.to_dict())
    if not continuing and config.pos_encoding.name != "learned":  # fine-tuning at another length: no weight is
        theirs.pop("data.seq_length"), ours.pop("data.seq_length")  # per position (learned ones are)
    if differ := [key for key in ours if theirs.get(key) != ours[key]]:
        # only the checkpoint's own keys: its pos_encoding= choice brings that encoding's settings (and no others)
        was = " ".join(as_override(key, theirs[key]) for key in differ if key in theirs)
        asked = " ".join(as_override(key, ours[key]) for key in differ)
        raise CheckpointError(
            f"{option}: the checkpoint's model has {was}, but this run asks for {asked}; pass {was} (or the model= "
            "it was trained with), or start a new run without it."
        )
    data = meta.get("data") or {}
    trained_on = data.get("path", "its corpus")
    if meta["vocab"] != vocab:
        only_theirs, only_ours = set(meta["vocab"]) - set(vocab), set(vocab) - set(meta["vocab"])
        differences = [f"{_show_characters(only_ours)} only in this corpus"] if only_ours else []
        differences += [f"{_show_characters(only_theirs)} only in the checkpoint's"] if only_theirs else []
        raise CheckpointError(
            f"{option}: the checkpoint's vocabulary has {len(meta['vocab'])} characters and this corpus's "
            f"{len(vocab)} ({', '.join(differences) or 'in another order'}); train on its corpus "
            f"(data.path={trained_on}), or start a new run without it."
        )
    if weights_only:
        other = data.get("sha256") not in (None, corpus_sha256) and corpus_sha256 is not None
        return (
            f"starting from the weights of {path} (step {checkpoint.get('global_step', 0)} of its run"
            + (f", trained on {trained_on}" if other else "")
            + "), with an optimizer and learning-rate schedule of this run's own"
        )
    if corpus_sha256 is None or data.get("sha256") in (None, corpus_sha256):
        return None
    if continuing:
        raise CheckpointError(
            f"{option}: that run trained on {trained_on} (sha256 {data['sha256'][:12]}), but this corpus has sha256 "
            f"{corpus_sha256[:12]}; a resumed run goes on with its own data, so pass data.path={trained_on}, or "
            f"fine-tune in a new run with ckpt_path={path}."
        )
    return (
        f"fine-tuning: {path} was trained on {trained_on} (sha256 {data['sha256'][:12]}); this run trains it on "
        f"this corpus (sha256 {corpus_sha256[:12]}) from its step {checkpoint.get('global_step', 0)}, with its "
        "optimizer state and learning-rate schedule."
    )
