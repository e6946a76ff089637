"""The loss that validation and evaluation share: summed cross-entropy over the targets that count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lm.model import Transformer

IGNORE_INDEX = -100  # targets with this id do not count in the loss


def summed_loss(model: Transformer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The validation loss of one batch: the sum of the cross-entropies (nats) of its targets, and their count
    (targets equal to IGNORE_INDEX count for nothing). Validation during training and `evaluate` both use it."""
    logits = model(x)
    total = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (y != IGNORE_INDEX).sum()
