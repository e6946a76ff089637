"""Reading text past the training context the ways generation does: the loss of the predictions it makes there,
for each way of going on (evaluate.py's `past_context=`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from lm.decoding import sliding_cache
from lm.errors import DataError
from lm.generate import NextCharacterLogits
from lm.model import Transformer

PAST_CONTEXT_WAYS = {
    "window": "recomputing the last seq_length characters (generation without the cache)",
    "rebuilt cache": "a KV cache rebuilt from the most recent half context whenever it is full",
    "sliding cache": "a KV cache of the most recent seq_length positions (RoPE, ALiBi, T5; generation's way there)",
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
