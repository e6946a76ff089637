"""Loss, perplexity and bits per character of a model over a split, exactly as validation computes them."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lm.data import IGNORE_INDEX, ValidationWindows
from lm.decoding import sliding_cache
from lm.errors import DataError
from lm.generate import NextCharacterLogits
from lm.model import ContextTooLongError, Transformer


@dataclass
class EvalResult:
    """Token-weighted mean cross-entropy (nats) over `tokens` targets, and what follows from it."""

    context_length: int
    tokens: int
    loss: float | None
    note: str = ""

    @property
    def ppl(self) -> float | None:
        return None if self.loss is None else math.exp(self.loss)

    @property
    def bpc(self) -> float | None:
        return None if self.loss is None else self.loss / math.log(2)

    def to_dict(self) -> dict:
        return {
            "context_length": self.context_length,
            "tokens": self.tokens,
            "loss": self.loss,
            "ppl": self.ppl,
            "bpc": self.bpc,
            "note": self.note,
        }


def summed_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation loss of one batch: the sum of the cross-entropies (nats) of its targets, and their count
    (targets equal to IGNORE_INDEX count for nothing). Validation during training and `evaluate` both use it."""
    logits = model(x)
    total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (y != IGNORE_INDEX).sum()


@torch.no_grad()
def evaluate(
    model: Transformer,
    ids: np.ndarray,
    context_length: int,
    batch_size: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Mean loss over every target of `ids`, reading it in non-overlapping windows of `context_length`.

    A model whose positions cannot reach `context_length` (learned absolute positions) gets `loss=None` and a
    note, rather than an error, so a table over several lengths still comes out.
    """
    device = next(model.parameters()).device
    if len(ids) < context_length + 1:
        return EvalResult(context_length, 0, None, f"split shorter than {context_length + 1} characters")
    total, count = 0.0, 0
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    model.eval()
    try:
        for x, y in ValidationWindows(ids, batch_size, context_length):
            x, y = x.to(device), y.to(device)
            with autocast:
                batch_total, batch_count = summed_loss(model, x, y)
            total += float(batch_total)
            count += int(batch_count)
    except ContextTooLongError:
        return EvalResult(context_length, 0, None, f"n/a: learned positions stop at {model.config.seq_length}")
    return EvalResult(context_length, count, total / count)


PAST_CONTEXT_WAYS = {
    "window": "recomputing the last seq_length characters (generation without the cache)",
    "rebuilt cache": "a KV cache rebuilt from the most recent half context whenever it is full",
    "sliding cache": "a KV cache of the most recent seq_length positions (RoPE and ALiBi; generation's way there)",
}


@torch.inference_mode()
def past_context_losses(model: Transformer, ids: np.ndarray, characters: int, streams: int = 8) -> dict:
    """How well the model predicts past its context in each way generation can go on there: the mean loss of
    `characters` predictions per stream after a first full context, for `streams` stretches of `ids` spread evenly
    over it, read as generation reads a text it wrote (`lm.generate.NextCharacterLogits`, with the model's own
    weights rather than generate's float16 copies).
    {way: loss}, the ways of `PAST_CONTEXT_WAYS` (no sliding cache for a model that cannot slide)."""
    device = next(model.parameters()).device
    context = model.config.seq_length
    span = context + characters + 1
    if streams < 1 or characters < 1 or len(ids) < span:
        raise DataError(
            f"past_context={characters} needs stretches of {span} characters (the context, then the predictions); "
            f"the split has {len(ids)}: pass a smaller past_context or a longer text."
        )
    starts = np.linspace(0, len(ids) - span, streams).astype(int)
    tokens = torch.from_numpy(np.stack([ids[s : s + span] for s in starts]).astype("int64")).to(device)
    targets = tokens[:, context + 1 :]
    model.eval()
    ways = {"window": dict(kv_cache=False), "rebuilt cache": dict(sliding=False)}
    if sliding_cache(model):
        ways["sliding cache"] = dict(sliding=True)
    losses = {}
    for way, kwargs in ways.items():
        logits_for_next = NextCharacterLogits(model, streams, **kwargs)
        logits_for_next(tokens, context)  # the first context: the prompt
        logits = torch.stack([logits_for_next(tokens, n) for n in range(context + 1, span)], dim=1)
        losses[way] = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()).item()
    return losses


def past_context_table(losses: dict) -> str:
    """`past_context_losses` as a Markdown table, one row per way."""
    lines = ["| past the context | loss | bpc |", "|---|---:|---:|"]
    lines += [
        f"| {way}: {PAST_CONTEXT_WAYS[way]} | {loss:.4f} | {loss / math.log(2):.4f} |" for way, loss in losses.items()
    ]
    return "\n".join(lines)


def results_table(results: list[EvalResult], trained_length: int) -> str:
    """The results as a Markdown table, one row per context length."""
    lines = ["| context | tokens | loss | ppl | bpc | note |", "|---:|---:|---:|---:|---:|---|"]
    for r in results:
        note = r.note or (
            "trained length"
            if r.context_length == trained_length
            else "longer than training"
            if r.context_length > trained_length
            else ""
        )
        if r.loss is None:
            lines.append(f"| {r.context_length} | - | - | - | - | {note} |")
        else:
            lines.append(f"| {r.context_length} | {r.tokens} | {r.loss:.4f} | {r.ppl:.3f} | {r.bpc:.4f} | {note} |")
    return "\n".join(lines)


def write_report(stem: Path | str, report: dict, table: str, title: str) -> None:
    """Writes `<stem>.eval.md` (the title and the table) and `<stem>.eval.json` (the report)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.eval.md").write_text(f"{title}\n\n{table}\n")
    Path(f"{stem}.eval.json").write_text(json.dumps(report, indent=2))
