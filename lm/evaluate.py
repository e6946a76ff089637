"""Loss, perplexity and bits per character of a model over a split, exactly as validation computes them."""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lm.data import ValidationWindows
from lm.loss import summed_loss
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


def write_eval_report(stem: Path | str, report: dict, table: str, title: str) -> None:
    """Writes `<stem>.eval.md` (the title and the table) and `<stem>.eval.json` (the report)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.eval.md").write_text(f"{title}\n\n{table}\n")
    Path(f"{stem}.eval.json").write_text(json.dumps(report, indent=2))
