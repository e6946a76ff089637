"""Parameter groups by role, and Muon + AdamW as one optimizer."""

from __future__ import annotations

import contextlib

import torch
import torch.optim._muon as torch_muon
from torch import nn

from lm.errors import ConfigError
from lm.hardware import cpu_supports_bf16

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


def newton_schulz_fp32(grad: torch.Tensor, ns_coefficients, ns_steps: int, eps: float) -> torch.Tensor:
    """torch's Newton-Schulz orthogonalisation (`torch.optim._muon._zeropower_via_newtonschulz`) in fp32 instead of
    bf16: the same quintic iteration X <- aX + (bA + cA^2)X with A = XX^T, on the wider side's transpose."""
    a, b, c = ns_coefficients
    x = grad.float()
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def fp32_newton_schulz():
    """Runs torch's Muon with `newton_schulz_fp32`. torch casts to bf16 for the iteration, which a CPU without
    native bf16 emulates ~100x slower than fp32: 1.56 s against 0.07 s a step for `mini`'s 16 matrices on a 2-core
    EPYC with AVX2, where it made Muon 3.6x slower than AdamW."""
    original = torch_muon._zeropower_via_newtonschulz
    torch_muon._zeropower_via_newtonschulz = newton_schulz_fp32
    try:
        yield
    finally:
        torch_muon._zeropower_via_newtonschulz = original


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` for the `hidden_matrices` group and `torch.optim.AdamW` for every other group, seen from
    outside as one optimizer: one `step()`, one state dict, one list of parameter groups that an LR scheduler
    drives. So Lightning's automatic optimization, gradient clipping, `max_steps` (one `global_step` per step) and
    exact resume work as with any single optimizer.

    With `adjust_lr_fn="match_rms_adamw"` (Moonshot, "Muon is Scalable for LLM Training") Muon's update is scaled
    to the RMS of a typical AdamW update, so both halves share one `lr` and `weight_decay`, as tuned for AdamW.
    `newton_schulz_dtype`: "bfloat16" (torch's own), "float32" (`newton_schulz_fp32`), or "auto": float32 for
    parameters on a CPU without native bf16, else torch's bf16.
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
        newton_schulz_dtype: str = "auto",
    ):
        groups = list(params)
        if not groups or not isinstance(groups[0], dict) or not any(g.get("name") == HIDDEN_MATRICES for g in groups):
            raise ConfigError(
                f"optimizer=muon needs parameter groups with a {HIDDEN_MATRICES!r} group, as "
                "lm.optim.parameter_groups makes them."
            )
        if newton_schulz_dtype not in ("auto", "bfloat16", "float32"):
            raise ConfigError(
                f"optimizer.newton_schulz_dtype={newton_schulz_dtype!r} is not auto, bfloat16 or float32."
            )
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        if newton_schulz_dtype == "auto":
            on_cpu = all(
                p.device.type == "cpu" for g in groups if g.get("name") == HIDDEN_MATRICES for p in g["params"]
            )
            newton_schulz_dtype = "float32" if on_cpu and not cpu_supports_bf16() else "bfloat16"
        self.newton_schulz_dtype = newton_schulz_dtype
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
        with fp32_newton_schulz() if self.newton_schulz_dtype == "float32" else contextlib.nullcontext():
            self.muon.step()
        self.adamw.step()
        return loss
