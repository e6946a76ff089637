"""Parameter groups by role, and Muon + AdamW as one optimizer."""

from __future__ import annotations

import torch
import torch.optim._muon as torch_muon
from torch import nn

from lm.errors import ConfigError, is_count, is_number
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


# Polar Express (Amsel, Persson, Musco, Gower, 2025: arXiv 2505.16932), as modded-nanogpt uses it: one (a, b, c) per
# step, each the best odd quintic for the singular values the previous steps can have left, so five steps bring
# them closer to 1 than torch's fixed coefficients do; with the 2% safety margin on the starting norm.
POLAR_EXPRESS_COEFFICIENTS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_SAFETY = 1.02
ORTHOGONALIZERS = ("newton_schulz", "polar_express")


def newton_schulz(
    updates: torch.Tensor, ns_coefficients, ns_steps: int, eps: float, dtype: torch.dtype, polar_express: bool = False
) -> torch.Tensor:
    """The Newton-Schulz orthogonalisation of torch's Muon (`torch.optim._muon._zeropower_via_newtonschulz`: the
    quintic iteration X <- aX + (bA + cA^2)X with A = XX^T, on the wider side's transpose), for a stack of
    same-shaped matrices (N, rows, cols) at once, in `dtype`: one batched product per step instead of one small
    product per matrix (on a GPU, a launch each). `polar_express`: the same iteration with Polar Express's
    coefficients for each step (`POLAR_EXPRESS_COEFFICIENTS`, at most five steps) instead of `ns_coefficients`."""
    x = updates.to(dtype)
    tall = updates.size(-2) > updates.size(-1)
    if tall:
        x = x.mT
    norm = x.norm(dim=(-2, -1), keepdim=True)
    if polar_express:
        x = x / (norm * POLAR_EXPRESS_SAFETY + eps)
        coefficients = POLAR_EXPRESS_COEFFICIENTS[:ns_steps]
    else:
        x = x / norm.clamp(min=eps)  # each matrix's spectral norm at most 1
        coefficients = [ns_coefficients] * ns_steps
    if x.dtype == torch.float32 and x.size(-1) >= GRAM_ITERATION_MIN_ASPECT * x.size(-2):
        x = gram_newton_schulz(x, coefficients)
    else:
        for a, b, c in coefficients:
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


# Where the Gram form pays: with r rows and c = t * r columns, five plain steps cost (10t + 5) r^3 multiply-adds
# and the Gram form (2t + 17) r^3, equal at t = 1.5; it is taken from 2, where it saves a sixth.
GRAM_ITERATION_MIN_ASPECT = 2


def gram_newton_schulz(x: torch.Tensor, coefficients) -> torch.Tensor:
    """The quintic iteration X <- (aI + bA + cA^2) X, A = XX^T, for wide (N, r, c) matrices (r < c), carried out on
    r x r matrices only. Each step multiplies X by a polynomial P of A, so after k steps X_k = Q_k X_0, and since
    every P and Q is a polynomial of A_0 they commute: Q <- P Q and A <- P^2 A, with one r x c product at each
    end instead of two per step. The same result as the plain iteration up to rounding, which is why it is only
    taken in fp32 (in bf16 the products' errors compound through A)."""
    gram = x @ x.mT
    transform = None
    for step, (a, b, c) in enumerate(coefficients):
        polynomial = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        polynomial.diagonal(dim1=-2, dim2=-1).add_(a)
        transform = polynomial if transform is None else polynomial @ transform
        if step < len(coefficients) - 1:
            gram = polynomial @ (polynomial @ gram)
    return x if transform is None else transform @ x


def normuon_scale(orthogonal: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon (Li et al., 2025: arXiv 2510.05491), as modded-nanogpt applies it: each neuron's (row's, or column's
    for a wide matrix) share of the orthogonalised update is divided by the square root of a running mean of its
    squared size, then the whole matrix is rescaled to the norm it had, so that Muon's lr keeps its meaning while
    neurons that keep getting large updates get smaller ones. `second_moment` (N, rows, 1) or (N, 1, cols) is
    updated in place."""
    reduce = -1 if orthogonal.size(-2) >= orthogonal.size(-1) else -2
    mean_square = orthogonal.float().square().mean(dim=reduce, keepdim=True)
    second_moment.lerp_(mean_square, 1 - beta2)
    scale = second_moment.clamp(min=1e-10).rsqrt()
    norm_before = mean_square.sum(dim=(-2, -1), keepdim=True).sqrt()
    norm_after = (mean_square * scale.square()).sum(dim=(-2, -1), keepdim=True).sqrt()
    return orthogonal * (scale * norm_before / norm_after.clamp(min=1e-10)).to(orthogonal.dtype)


class BatchedMuon(torch.optim.Muon):
    """torch's `Muon` (same settings, state and update), with its Newton-Schulz iteration run once per matrix shape
    over all same-shaped matrices stacked (`newton_schulz`), and the momentum, decay and update as foreach ops.

    Four later refinements, each off by default (then the step is torch's): `orthogonalizer="polar_express"`
    (Polar Express's per-step coefficients), `normuon_beta2` (NorMuon's per-neuron second moment, kept in each
    parameter's state as `normuon_second_moment`), `cautious_weight_decay` (decay only the entries that the
    update is already shrinking, as modded-nanogpt does: Chen et al., 2025, "Cautious Weight Decay") and
    `momentum_warmup_steps` (the momentum rises from `momentum_warmup_start`: `momentum_at`)."""

    def __init__(
        self,
        params,
        newton_schulz_dtype: torch.dtype = torch.bfloat16,
        orthogonalizer: str = "newton_schulz",
        normuon_beta2: float | None = None,
        cautious_weight_decay: bool = False,
        momentum_warmup_steps: int = 0,
        momentum_warmup_start: float = 0.85,
        **kwargs,
    ):
        super().__init__(params, **kwargs)
        self.newton_schulz_dtype = newton_schulz_dtype
        self.orthogonalizer = orthogonalizer
        self.normuon_beta2 = normuon_beta2
        self.cautious_weight_decay = cautious_weight_decay
        self.momentum_warmup_steps, self.momentum_warmup_start = momentum_warmup_steps, momentum_warmup_start

    def momentum_at(self, group: dict) -> float:
        """The group's momentum for its next step: with a momentum warmup, from `momentum_warmup_start` at the
        first step linearly to `momentum` at step `momentum_warmup_steps` (modded-nanogpt's 0.85 to 0.95); the
        steps taken are counted in the group (`muon_steps`), so they are saved with the optimizer's state."""
        if not self.momentum_warmup_steps:
            return group["momentum"]
        progress = min(group.get("muon_steps", 0) / self.momentum_warmup_steps, 1.0)
        return self.momentum_warmup_start + progress * (group["momentum"] - self.momentum_warmup_start)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            lr, momentum = group["lr"], self.momentum_at(group)
            if self.momentum_warmup_steps:
                group["muon_steps"] = group.get("muon_steps", 0) + 1
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            by_shape: dict[torch.Size, list[int]] = {}
            for i, param in enumerate(params):
                by_shape.setdefault(param.shape, []).append(i)
            for shape, indices in by_shape.items():
                stacked = torch.stack([updates[i] for i in indices])
                orthogonal = newton_schulz(
                    stacked,
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                    self.newton_schulz_dtype,
                    polar_express=self.orthogonalizer == "polar_express",
                )
                same_shape = [params[i] for i in indices]
                if self.normuon_beta2 is not None:
                    orthogonal = self.normuon(orthogonal, same_shape)
                step = list(orthogonal.to(same_shape[0].dtype).unbind(0))
                decay = lr * group["weight_decay"]
                if self.cautious_weight_decay:
                    # p -= lr * u already shrinks |p| where p and u agree in sign: only there does the decay apply
                    for param, update in zip(same_shape, step, strict=True):
                        param.sub_(param * (param * update >= 0), alpha=decay)
                else:
                    torch._foreach_mul_(same_shape, 1 - decay)
                adjusted_lr = torch_muon._adjust_lr(lr, group["adjust_lr_fn"], shape)
                torch._foreach_add_(same_shape, step, alpha=-adjusted_lr)
        return loss

    def normuon(self, orthogonal: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """NorMuon's scaling of a stack of same-shaped updates, with each parameter's second moment in its state."""
        tall = orthogonal.size(-2) >= orthogonal.size(-1)
        moment_shape = (orthogonal.size(-2), 1) if tall else (1, orthogonal.size(-1))
        for param in params:
            self.state[param].setdefault(
                "normuon_second_moment", torch.zeros(moment_shape, device=param.device, dtype=torch.float32)
            )
        second_moment = torch.stack([self.state[p]["normuon_second_moment"] for p in params])
        scaled = normuon_scale(orthogonal, second_moment, self.normuon_beta2)
        for param, moment in zip(params, second_moment.unbind(0), strict=True):
            self.state[param]["normuon_second_moment"].copy_(moment)
        return scaled


class MuonWithAdamW(torch.optim.Optimizer):
    """`torch.optim.Muon` for the `hidden_matrices` group and `torch.optim.AdamW` for every other group, seen from
    outside as one optimizer: one `step()`, one state dict, one list of parameter groups that an LR scheduler
    drives. So Lightning's automatic optimization, gradient clipping, `max_steps` (one `global_step` per step) and
    exact resume work as with any single optimizer.

    With `adjust_lr_fn="match_rms_adamw"` (Moonshot, "Muon is Scalable for LLM Training") Muon's update is scaled
    to the RMS of a typical AdamW update, so both halves share one `lr` and `weight_decay`, as tuned for AdamW.
    `newton_schulz_dtype`: "bfloat16" (torch's own), "float32", or "auto": float32 for parameters on a CPU where
    bf16 does not pay (`cpu_supports_bf16`; one that emulates bf16 made a Muon step several times an AdamW one),
    else bf16. The iteration runs batched over same-shaped matrices (`BatchedMuon`). `embedding_lr`: a learning
    rate of its own for the `embeddings` group (the token embedding, a tied head, learned positions), as
    modded-nanogpt gives its embeddings; null: `lr`. The schedule scales every group's lr alike.
    `orthogonalizer`, `normuon_beta2`, `cautious_weight_decay`, `momentum_warmup_steps`, `momentum_warmup_start`:
    Muon's later refinements (`BatchedMuon`).
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
        embedding_lr: float | None = None,
        orthogonalizer: str = "newton_schulz",
        normuon_beta2: float | None = None,
        cautious_weight_decay: bool = False,
        momentum_warmup_steps: int = 0,
        momentum_warmup_start: float = 0.85,
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
        if embedding_lr is not None:
            if isinstance(embedding_lr, bool) or not isinstance(embedding_lr, int | float) or embedding_lr <= 0:
                raise ConfigError(f"optimizer.embedding_lr={embedding_lr!r} must be a positive number, or null for lr.")
            groups = [{**g, "lr": embedding_lr} if g.get("name") == "embeddings" else g for g in groups]
        if orthogonalizer not in ORTHOGONALIZERS:
            raise ConfigError(
                f"optimizer.orthogonalizer={orthogonalizer!r} is not one of {', '.join(ORTHOGONALIZERS)}."
            )
        if orthogonalizer == "polar_express" and not 1 <= ns_steps <= len(POLAR_EXPRESS_COEFFICIENTS):
            raise ConfigError(
                f"optimizer.ns_steps={ns_steps} with polar_express: Polar Express has coefficients for 1 to "
                f"{len(POLAR_EXPRESS_COEFFICIENTS)} steps; pick one of those."
            )
        if normuon_beta2 is not None and (
            isinstance(normuon_beta2, bool) or not isinstance(normuon_beta2, int | float) or not 0 <= normuon_beta2 < 1
        ):
            raise ConfigError(f"optimizer.normuon_beta2={normuon_beta2!r} must be in [0, 1), or null for no NorMuon.")
        if not is_count(momentum_warmup_steps, minimum=0):
            raise ConfigError(
                f"optimizer.momentum_warmup_steps={momentum_warmup_steps!r} must be a whole number of steps, 0 or more."
            )
        if not is_number(momentum_warmup_start) or not 0 <= momentum_warmup_start < 1:
            raise ConfigError(f"optimizer.momentum_warmup_start={momentum_warmup_start!r} must be in [0, 1).")
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay))
        if newton_schulz_dtype == "auto":
            on_cpu = all(
                p.device.type == "cpu" for g in groups if g.get("name") == HIDDEN_MATRICES for p in g["params"]
            )
            newton_schulz_dtype = "float32" if on_cpu and not cpu_supports_bf16() else "bfloat16"
        self.newton_schulz_dtype = newton_schulz_dtype
        # the inner optimizers fill in their own settings on the shared group dicts
        self.muon = BatchedMuon(
            self._groups(muon=True),
            newton_schulz_dtype=getattr(torch, newton_schulz_dtype),
            orthogonalizer=orthogonalizer,
            normuon_beta2=normuon_beta2,
            cautious_weight_decay=bool(cautious_weight_decay),
            momentum_warmup_steps=momentum_warmup_steps,
            momentum_warmup_start=momentum_warmup_start,
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
