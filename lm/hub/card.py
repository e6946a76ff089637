"""The model card (README.md) of an exported model: Hub metadata, what the model is, how it was trained, how to load
it."""

from __future__ import annotations

import json
from pathlib import Path

from lm.model import TransformerConfig

KNOWN_DATASETS = {  # corpus file name -> its Hugging Face dataset, for the card's metadata
    "tinyshakespeare.txt": "karpathy/tiny_shakespeare",
    "enwik8": "LTCB/enwik8",
}


def run_directory(checkpoint_path: Path) -> Path | None:
    """The run directory of a checkpoint at <run>/checkpoints/<name>.ckpt, where it has its summary."""
    run = checkpoint_path.parent.parent if checkpoint_path.parent.name == "checkpoints" else checkpoint_path.parent
    return run if (run / "summary.json").is_file() or (run / ".hydra").is_dir() else None


def run_record(checkpoint_path: Path, step: int) -> tuple[dict, dict, list[str]]:
    """The run's settings (summary.json) and its command line's overrides (.hydra/overrides.yaml), where the checkpoint
    still sits in its run directory, and its final metrics where they are this checkpoint's (the run ended at its
    `step`); else empty."""
    run = run_directory(checkpoint_path)
    metrics, hparams, overrides = {}, {}, []
    if run is None:
        return metrics, hparams, overrides
    try:
        summary = json.loads((run / "summary.json").read_text())
        hparams = summary.get("hparams", {})
        if summary.get("global_step") == step:  # else the metrics are of other weights (a best.ckpt from before)
            metrics = summary.get("metrics", {})
    except (OSError, json.JSONDecodeError):
        pass
    try:
        lines = (run / ".hydra" / "overrides.yaml").read_text().splitlines()
        overrides = [line[2:] for line in lines if line.startswith("- ")]
    except OSError:
        pass
    return metrics, hparams, overrides


def training_settings(hparams: dict) -> str:
    """The run's optimizer, batch, precision and seed in one line, from summary.json's hparams."""
    optimizer, data, trainer = (hparams.get(key) or {} for key in ("optimizer", "data", "trainer"))
    parts = []
    if optimizer:
        parts.append(
            f"{optimizer.get('name', '?')} (lr {optimizer.get('lr')}, weight decay {optimizer.get('weight_decay')})"
        )
    if data:
        parts.append(f"batches of {data.get('batch_size')} x {data.get('seq_length')} characters")
    if trainer.get("precision"):
        parts.append(f"precision {trainer['precision']}")
    if hparams.get("seed") is not None:
        parts.append(f"seed {hparams['seed']}")
    return ", ".join(parts)


def describe_block(c: TransformerConfig) -> str:
    """The block's options in words, e.g. "pre-LN, LayerNorm, GELU MLP, tied embeddings"."""
    parts = [f"{c.norm_position}-LN", {"layernorm": "LayerNorm", "rmsnorm": "RMSNorm"}[c.norm]]
    parts.append({"gelu": "GELU", "relu": "ReLU", "relu2": "squared-ReLU", "swiglu": "SwiGLU"}[c.mlp] + " MLP")
    if c.qk_norm:
        parts.append("QK-norm")
    if c.kv_heads != c.n_head:
        parts.append(f"{c.kv_heads} key/value heads")
    if c.attention_window is not None:
        parts.append(
            f"sliding window {c.attention_window}" + (f" + {c.attention_sinks} sinks" * bool(c.attention_sinks))
        )
    parts.append("tied embeddings" if c.tie_embeddings else "untied head")
    if c.logit_softcap is not None:
        parts.append(f"logits soft-capped at {c.logit_softcap:g}")
    if c.unet_skips:
        parts.append("U-Net skips")
    if c.value_embeddings:
        parts.append(f"{c.value_embeddings} value embedding table" + "s" * (c.value_embeddings > 1))
    if c.value_residual:
        parts.append("value residual")
    if c.bias:
        parts.append("biases")
    return ", ".join(parts)


def describe_encoding(c: TransformerConfig) -> str:
    pe = c.pos_encoding
    text = pe.name
    if pe.name in ("rope", "xpos"):
        text += f" (base {pe.base:g}"
        text += f", {pe.rotary_fraction:g} of each head rotates" if pe.rotary_fraction != 1 else ""
        text += f", {pe.scaling} x{pe.scaling_factor:g}" if pe.scaling else ""
        text += ")"
    return text


def model_card(
    config: TransformerConfig,
    vocab: str,
    data: dict,
    step: int,
    metrics: dict,
    hparams: dict,
    overrides: list[str],
    parameters: int,
    way: str,
    name: str,
) -> str:
    """README.md for an export: YAML metadata the Hub reads, then the model, its training and a loading snippet."""
    corpus = Path(data.get("path") or "unknown corpus").name
    dataset = KNOWN_DATASETS.get(corpus)
    custom = "custom code" in way
    metadata = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags:",
        *(f"- {tag}" for tag in ("transformer-lm", "character-level", config.pos_encoding.name)),
        *(["datasets:", f"- {dataset}"] if dataset else []),
        "metrics:",
        "- perplexity",
        "---",
    ]
    rows = [
        ("parameters", f"{parameters:,}"),
        ("layers x width x heads", f"{config.n_layer} x {config.n_embd} x {config.n_head}"),
        ("positional encoding", describe_encoding(config)),
        ("block", describe_block(config)),
        ("context", f"{config.seq_length} characters"),
        ("vocabulary", f"{len(vocab)} {'bytes' if data.get('encoding') == 'bytes' else 'characters'}"),
        ("corpus", corpus + (f" (sha256 {data['sha256'][:12]})" if data.get("sha256") else "")),
        ("training steps", f"{step:,}"),
    ]
    for key in ("val/loss", "val/bpc", "val/ppl"):
        if key in metrics:
            rows.append((key, f"{metrics[key]:.4f}"))
    rows.append(("transformers class", way))
    trust = ", trust_remote_code=True" if custom else ""
    learned = config.pos_encoding.name == "learned" and not custom  # GPT-2: positions end at the context
    new_characters = min(200, config.seq_length - len("ROMEO:")) if learned else 200
    command = "python scripts/train.py " + " ".join(overrides) if overrides else "(its command line was not recorded)"
    lines = [
        *metadata,
        "",
        f"# {name}",
        "",
        "A character-level Transformer language model trained with "
        "transformer-lm: one token per character"
        + (" (per byte)" if data.get("encoding") == "bytes" else "")
        + ". Validation loss is in nats per character; bpc is bits per character.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in rows),
        "",
        "## How it was trained",
        "",
        "```",
        command.strip(),
        "```",
        "",
        *([training_settings(hparams) + ".", ""] if hparams else []),
        "## Use it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}"{trust})',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        'generate = pipeline("text-generation", model=model, tokenizer=tokenizer)',
        f'print(generate("ROMEO:", max_new_tokens={new_characters}, do_sample=False)[0]["generated_text"])',
        "```",
        "",
        *(
            [
                f"Its learned positions end at {config.seq_length}: prompt and new characters together must fit "
                "(transformer-lm's generate.py slides past the context).",
                "",
            ]
            if learned
            else []
        ),
        "Characters outside the vocabulary are an error of the tokenizer, not replaced. With transformer-lm "
        f'itself: `python scripts/generate.py ckpt={name} prompt="ROMEO:"`, or '
        f"`python scripts/train.py init_from={name} ...` to fine-tune.",
        "",
    ]
    return "\n".join(lines)
