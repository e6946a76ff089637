"""Exporting a trained checkpoint as a Hugging Face model directory (`python scripts/export.py`).

The directory holds model.safetensors, config.json, generation_config.json, the character tokenizer
(tokenizer.json, tokenizer_config.json), a model card (README.md) and transformer_lm.json (what it came from, so
transformer-lm reads it back). A native `transformers` class is used wherever one computes the same function
(lm/hub/families.py); any other configuration exports as custom code (lm/hub/remote). Before the directory
appears, the export loads it back with `transformers` and compares its logits with the checkpoint's.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from lm.checkpoint import CHECKPOINT_KEY, model_state, read_checkpoint
from lm.errors import CheckpointError, ConfigError, LMError
from lm.hub.card import model_card, run_record
from lm.hub.families import Family, native_family
from lm.hub.load import CUSTOM, EXPORT_FORMAT, EXPORT_META
from lm.hub.tokenizer import build_tokenizer
from lm.model import Transformer, TransformerConfig

# the custom model's code: lm/hub/remote's two files and the model's own modules, `from lm.x import` made relative
LM_DIR = Path(__file__).resolve().parent.parent
REMOTE_SOURCES = [
    Path(__file__).resolve().parent / "remote" / "configuration_transformer_lm.py",
    Path(__file__).resolve().parent / "remote" / "modeling_transformer_lm.py",
    *(LM_DIR / name for name in ("model.py", "positional.py", "fused.py", "kernels.py", "errors.py")),
]
LM_IMPORT = re.compile(r"^from lm\.(?:\w+\.)*(\w+) import", re.MULTILINE)
TOLERANCE = 1e-4  # the largest fp32 logit difference the export accepts
SAMPLING = {"do_sample": True, "temperature": 0.8, "max_new_tokens": 500}  # conf/generate.yaml's defaults


def require_transformers() -> None:
    """One sentence, not a traceback, where the optional packages are missing."""
    missing = [name for name in ("transformers", "tokenizers", "safetensors") if not _importable(name)]
    if missing:
        raise LMError(
            f"Exporting needs {', '.join(missing)}, which training does not install; install them with "
            'pip install -e ".[hf]".'
        )


def quiet_transformers() -> None:
    """No progress bars or notices from `transformers` while it saves and loads: the export says what matters."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    logging.set_verbosity_error()


def _importable(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


@dataclass
class ExportReport:
    """What `export` wrote: where, which way (a native class or custom code), and the largest logit difference."""

    path: Path
    architecture: str
    native: bool
    max_difference: float

    def line(self) -> str:
        way = "native transformers class" if self.native else "custom code (trust_remote_code=True)"
        return (
            f"[export] {self.path}: {self.architecture}, {way}; logits match the checkpoint's to "
            f"{self.max_difference:.1e} (fp32)"
        )


def check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out={out} exists and is not empty; pass a new directory, or remove that one first.")


def export(ckpt: str | Path, out: str | Path) -> ExportReport:
    """Writes the model of `ckpt` (a .ckpt file or a run directory) to the new directory `out` in the Hugging Face
    format. Bad input raises an LMError before anything is written; a failure later removes what was written."""
    out = Path(out).expanduser()
    check_destination(out)
    require_transformers()
    quiet_transformers()
    checkpoint, path = read_checkpoint(ckpt, fix="pass ckpt= a .ckpt file or a run directory")
    if checkpoint.get("exported"):
        raise ConfigError(f"ckpt={path} is an export already; pass the .ckpt file or run directory it came from.")
    meta = checkpoint[CHECKPOINT_KEY]
    config = TransformerConfig(**meta["model_config"])
    model = Transformer(config)
    try:
        model.load_state_dict(model_state(checkpoint))
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not match its own model config ({error}).") from None
    model.eval()
    family = native_family(config)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        architecture = write_model(model, family, staging)
        byte_level = (meta.get("data") or {}).get("encoding") == "bytes"
        build_tokenizer(meta["vocab"], byte_level, config.seq_length).save_pretrained(staging)
        metrics, hparams, overrides = run_record(path, checkpoint.get("global_step", 0))
        if not metrics and math.isfinite(checkpoint.get("best_val_loss", math.inf)) and path.name == "best.ckpt":
            # the best checkpoint is saved right after the validation that made it best: that is its loss
            loss = checkpoint["best_val_loss"]
            metrics = {"val/loss": loss, "val/bpc": loss / math.log(2), "val/ppl": math.exp(loss)}
        way = f"{architecture} (native)" if family else f"{architecture} (custom code, trust_remote_code=True)"
        (staging / "README.md").write_text(
            model_card(
                config,
                meta["vocab"],
                meta.get("data") or {},
                checkpoint.get("global_step", 0),
                metrics,
                hparams,
                overrides,
                model.num_parameters(),
                way,
                out.name,
            )
        )
        export_meta = {
            "format": EXPORT_FORMAT,
            "family": family.model_type if family else CUSTOM,
            "model_config": config.to_dict(),
            "vocab": meta["vocab"],
            "data": meta.get("data") or {},
            "global_step": checkpoint.get("global_step", 0),
            "metrics": metrics,
        }
        (staging / EXPORT_META).write_text(json.dumps(export_meta, indent=2) + "\n")
        difference = compare_logits(model, staging, trust_remote_code=family is None)
        if difference > TOLERANCE:
            raise CheckpointError(
                f"the exported {architecture} gives logits {difference:.1e} away from the checkpoint's (more than "
                f"{TOLERANCE:g}); this is a bug in the export, please report it with the run's model config."
            )
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's is private; the export is to share
        if out.exists():
            out.rmdir()  # empty (checked above)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(out, architecture, family is not None, difference)


def write_model(model: Transformer, family: Family | None, directory: Path) -> str:
    """Saves the weights, config.json and generation_config.json (and the custom code where needed); returns the
    `transformers` class's name."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    config = model.config
    state = {key: value.detach().float().cpu() for key, value in model.state_dict().items()}
    if family is not None:
        hf_config = AutoConfig.for_model(family.model_type, **family.hf_config(config))
        hf_model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        mapped = {key: value.contiguous() for key, value in family.to_hf(config, state).items()}
        load_exactly(hf_model, mapped, family.architecture)
        sampling = dict(SAMPLING)
        if config.pos_encoding.name == "learned":  # GPT-2's learned table ends at the training context
            del sampling["max_new_tokens"]
            sampling["max_length"] = config.seq_length
        generation = GenerationConfig(**sampling, **no_special_tokens())
    else:
        from lm.hub.remote.configuration_transformer_lm import TransformerLMConfig
        from lm.hub.remote.modeling_transformer_lm import TransformerLMForCausalLM

        hf_config = TransformerLMConfig(
            model_config=config.to_dict(),
            vocab_size=config.vocab_size,
            tie_word_embeddings=config.tie_embeddings,
            **no_special_tokens(),
        )
        hf_config.auto_map = {
            "AutoConfig": "configuration_transformer_lm.TransformerLMConfig",
            "AutoModelForCausalLM": "modeling_transformer_lm.TransformerLMForCausalLM",
        }
        hf_model = TransformerLMForCausalLM(hf_config)
        hf_model.model.load_state_dict(state)
        copy_remote_code(directory)
        generation = GenerationConfig(**SAMPLING, use_cache=False, **no_special_tokens())  # it has no KV cache
    hf_model.save_pretrained(directory)
    generation.save_pretrained(directory)
    return type(hf_model).__name__


def no_special_tokens() -> dict:
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def load_exactly(hf_model: torch.nn.Module, state: dict[str, torch.Tensor], architecture: str) -> None:
    """Loads every tensor of the class, from `state` alone: a key left over or missing is a bug in the mapping."""
    expected = set(hf_model.state_dict())
    if missing := expected - set(state):
        raise CheckpointError(f"the mapping to {architecture} leaves {sorted(missing)[:3]} unset; please report it.")
    if extra := set(state) - expected:
        raise CheckpointError(f"the mapping to {architecture} writes unknown {sorted(extra)[:3]}; please report it.")
    hf_model.load_state_dict(state)


def copy_remote_code(directory: Path) -> None:
    """The custom model's source beside its weights, its `from lm.x import` made `from .x import`."""
    for source in REMOTE_SOURCES:
        (directory / source.name).write_text(LM_IMPORT.sub(r"from .\1 import", source.read_text()))


def compare_logits(model: Transformer, directory: Path, trust_remote_code: bool) -> float:
    """Loads `directory` with `transformers` as a user would and returns the largest absolute difference between its
    fp32 logits and `model`'s over two random texts of a full context."""
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=trust_remote_code, dtype=torch.float32)
    loaded.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (2, model.config.seq_length), generator=generator)
    with torch.no_grad():
        ours = model.float()(ids)
        theirs = loaded(input_ids=ids).logits.float()
    return (ours - theirs).abs().max().item()
