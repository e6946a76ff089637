"""Parameter groups by role, and Muon + AdamW as one optimizer."""

from __future__ import annotations

import torch
from torch import nn

from lm.errors import ConfigError

HIDDEN_MATRICES = "hidden_matrices"


def parameter_groups(model: nn.Module) -> list[dict]:
    """The model's parameters by role, routed by module rather than by shape:

    - `hidden_matrices`: the weights of the linear layers inside the Transformer blocks (Muon's share);
    - `embeddings`: the token embedding (also the tied output head) and learned positions, with weight decay;
    - `vectors`: biases and norm gains, without weight decay.
    """
    hidden = [m.weight for block in model.blocks for m in block.modules() if isinstance(m, nn.Linear)]
    hidden_ids = {id(p) for p in hidden}
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden_ids]
    return [
        {"params": hidden, "name": HIDDEN_MATRICES},
        {"params": [p for p in others if p.dim() >= 2], "name": "embeddings"},
        {"params": [p for p in others if p.dim() < 2], "name": "vectors", "weight_decay": 0.0},
    ]


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` for the `hidden_matrices` group and `torch.optim.AdamW` for every other group, seen from
    outside as one optimizer: one `step()`, one state dict, one list of parameter groups that an LR scheduler
    drives. So Lightning's automatic optimization, gradient clipping, `max_steps` (one `global_step` per step) and
    exact resume work as with any single optimizer.

    With `adjust_lr_fn="match_rms_adamw"` (Moonshot, "Muon is Scalable for LLM Training") Muon's update is scaled
    to the RMS of a typical AdamW update, so both halves share one `lr` and `weight_decay`, as tuned for AdamW.
    """

    def __init__(
        self,
        params,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        adjust_lr_fn: str = "match_rms_adamw",
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
    ):
        groups = list(params)
        if not groups or not isinstance(groups[0], dict) or not any(g.get("name") == HIDDEN_MATRICES for g in groups):
            raise ConfigError(
                f"optimizer=muon needs parameter groups with a {HIDDEN_MATRICES!r} group, as "
                "lm.optim.parameter_groups makes them."
            )
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        # the inner optimizers fill in their own settings on the shared group dicts
        self.muon = torch.optim.Muon(
            self._groups(muon=True),
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
        )
        self.adamw = torch.optim.AdamW(self._groups(muon=False), lr=lr, weight_decay=weight_decay, betas=betas, eps=eps)
        self._link()

    def _groups(self, muon: bool) -> list[dict]:
        return [g for g in self.param_groups if (g.get("name") == HIDDEN_MATRICES) == muon]

    def _link(self) -> None:
        """Points both inner optimizers at this optimizer's group dicts and state, which are what is saved."""
        self.muon.param_groups, self.adamw.param_groups = self._groups(muon=True), self._groups(muon=False)
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # builds new group dicts and a new state
        self._link()

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss
