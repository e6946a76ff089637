"""nanoGPT (github.com/karpathy/nanoGPT), condensed: its model.py and its train.py loop with the settings of its
config/train_shakespeare_char.py, the baseline `scripts/benchmark.py` measures this project against. Two recipes:

- `gpu`, the config as it is (6 x 384, context 256, batch 64, dropout 0.2, 5,000 iterations, bf16 autocast,
  compiled, fused AdamW, TF32, evaluation of 200 batches every 250 iterations, the loss read every 10):
      python train.py config/train_shakespeare_char.py
- `cpu`, its documented CPU command (fp32: nanoGPT's `nullcontext` on a CPU, not compiled):
      python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
          --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
          --lr_decay_iters=2000 --dropout=0.0

As a script it runs a recipe in a fresh process and prints its evaluations as JSON (only torch and numpy are
imported, as in nanoGPT, so its start-up time is nanoGPT's own):

    python scripts/_nanogpt.py data/tinyshakespeare.txt [--recipe gpu|cpu] [--max-iters N] [--patience K]

`--patience K` stops K evaluations after the best one (nanoGPT itself runs on; the losses up to there are the same).
Left out: checkpoint writing (nanoGPT saves a ckpt.pt when the validation estimate improves), wandb, DDP.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# config/train_shakespeare_char.py as it is: what nanoGPT runs on a GPU
GPU_RECIPE = dict(
    n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, learning_rate=1e-3,
    max_iters=5000, lr_decay_iters=5000, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
    grad_clip=1.0, eval_interval=250, eval_iters=200, log_interval=10, seed=1337, device="cuda", compile=True,
    dtype="bfloat16",
)  # fmt: skip
# with the CPU command line above (fp32 on a CPU: nanoGPT's `nullcontext`)
CPU_RECIPE = {
    **GPU_RECIPE,
    **dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, max_iters=2000,
           lr_decay_iters=2000, eval_iters=20, log_interval=1, device="cpu", compile=False, dtype="float32"),
}  # fmt: skip
RECIPES = {"gpu": GPU_RECIPE, "cpu": CPU_RECIPE}


class NanoGPTReference(torch.nn.Module):
    """nanoGPT's model.py, condensed: learned positions, SDPA attention with dropout, `nn.Dropout`, GELU MLP,
    LayerNorm without bias, tied head. The baseline the performance targets are set against."""

    def __init__(self, vocab_size: int, seq_length: int, n_layer: int, n_head: int, n_embd: int, dropout: float):
        super().__init__()
        nn = torch.nn
        self.n_head, self.dropout = n_head, dropout
        self.wte, self.wpe = nn.Embedding(vocab_size, n_embd), nn.Embedding(seq_length, n_embd)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(
            nn.ModuleDict(
                dict(
                    ln_1=nn.LayerNorm(n_embd, bias=False),
                    c_attn=nn.Linear(n_embd, 3 * n_embd, bias=False),
                    attn_proj=nn.Linear(n_embd, n_embd, bias=False),
                    attn_drop=nn.Dropout(dropout),
                    ln_2=nn.LayerNorm(n_embd, bias=False),
                    c_fc=nn.Linear(n_embd, 4 * n_embd, bias=False),
                    mlp_proj=nn.Linear(4 * n_embd, n_embd, bias=False),
                    mlp_drop=nn.Dropout(dropout),
                )
            )
            for _ in range(n_layer)
        )
        self.ln_f = nn.LayerNorm(n_embd, bias=False)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        # nanoGPT's _init_weights: N(0, 0.02) for linear and embedding weights, the residual projections scaled
        for name, param in self.named_parameters():
            if param.dim() >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                torch.nn.init.normal_(param, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(T, device=idx.device)))
        for h in self.h:
            q, k, v = h.c_attn(h.ln_1(x)).split(x.shape[-1], dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            dropout_p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            x = x + h.attn_drop(h.attn_proj(y.transpose(1, 2).contiguous().view(B, T, -1)))
            x = x + h.mlp_drop(h.mlp_proj(F.gelu(h.c_fc(h.ln_2(x)))))
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def learning_rate(it: int, r: dict) -> float:
    """nanoGPT's get_lr: linear warmup, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if it < r["warmup_iters"]:
        return r["learning_rate"] * (it + 1) / (r["warmup_iters"] + 1)
    if it > r["lr_decay_iters"]:
        return r["min_lr"]
    ratio = (it - r["warmup_iters"]) / (r["lr_decay_iters"] - r["warmup_iters"])
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["learning_rate"] - r["min_lr"])


def train_recipe(corpus: Path, recipe: str = "cpu", patience: int | None = None, **overrides) -> dict:
    """nanoGPT's train.py loop on its prepare.py split (first 90% train, last 10% val) of `corpus`, with `recipe`'s
    settings and `overrides`; with `patience`, it stops that many evaluations after the best.

    Returns the validation estimates (nanoGPT's own: the mean loss of `eval_iters` random batches) by iteration,
    with the seconds since the process started and the Unix time of each.
    """
    r = {**RECIPES[recipe], **overrides}
    device = r["device"]
    torch.manual_seed(r["seed"])
    torch.backends.cuda.matmul.allow_tf32 = True  # as nanoGPT's train.py sets them
    torch.backends.cudnn.allow_tf32 = True
    text = corpus.read_text(encoding="utf-8")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)  # nanoGPT's prepare.py (run beforehand there: ~0.3 s)
    split = int(len(ids) * 0.9)
    data = {"train": ids[:split], "val": ids[split:]}
    bs, T = r["batch_size"], r["block_size"]

    def get_batch(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = data[name]
        ix = torch.randint(len(d) - T, (bs,))
        x = torch.stack([torch.from_numpy(d[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(d[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        if device == "cuda":  # pinned, copied without waiting: nanoGPT's get_batch
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x, y

    model = NanoGPTReference(len(chars), T, r["n_layer"], r["n_head"], r["n_embd"], r["dropout"]).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    betas = (r["beta1"], r["beta2"])
    optimizer = torch.optim.AdamW(groups, lr=r["learning_rate"], betas=betas, fused=device == "cuda")
    if r["compile"]:
        model = torch.compile(model)
    # nanoGPT's `ctx`: `nullcontext` on a CPU, autocast to its dtype on a GPU
    if device == "cpu" or r["dtype"] == "float32":
        autocast = contextlib.nullcontext()
    else:
        autocast = torch.autocast(device, dtype=getattr(torch, r["dtype"]))

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        out = {}
        for name in data:
            losses = torch.zeros(r["eval_iters"])
            for k in range(r["eval_iters"]):
                with autocast:
                    losses[k] = model(*get_batch(name)).item()
            out[name] = float(losses.mean())
        model.train()
        return out

    evals = []
    x, y = get_batch("train")
    for it in range(r["max_iters"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, r)
        if it % r["eval_interval"] == 0 or it == r["max_iters"]:
            losses = estimate_loss()
            evals.append({"iter": it, "seconds": time.perf_counter() - START, "time": time.time(), **losses})
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", file=sys.stderr)
            best = min(range(len(evals)), key=lambda i: evals[i]["val"])
            if patience is not None and len(evals) - 1 - best >= patience:
                break
        if it == r["max_iters"]:
            break
        with autocast:
            loss = model(x, y)
        x, y = get_batch("train")  # the next batch is fetched while the GPU works on this one
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if it % r["log_interval"] == 0:
            loss.item()  # nanoGPT reads the loss to log it, which waits for the GPU
    best = min(evals, key=lambda e: e["val"])
    return {
        "recipe": r,
        "evals": evals,
        "val_loss": evals[-1]["val"],
        "best_val_loss": best["val"],
        "best_iter": best["iter"],
        "seconds": time.perf_counter() - START,
    }


START = time.perf_counter()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--recipe", choices=RECIPES, default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-iters", type=int, help="the recipe's by default; lr_decay_iters follows it")
    parser.add_argument("--patience", type=int, help="stop this many evaluations after the best")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="other recipe settings")
    args = parser.parse_args()
    overrides = {}
    for item in args.set:
        key, value = item.split("=", 1)
        if key not in GPU_RECIPE:
            sys.exit(f"error: --set {item}: no such setting; choose from {', '.join(GPU_RECIPE)}.")
        kind = type(GPU_RECIPE[key])
        overrides[key] = value.lower() in ("1", "true") if kind is bool else kind(value)
    if args.max_iters is not None:
        overrides.update(max_iters=args.max_iters, lr_decay_iters=args.max_iters)
    result = train_recipe(args.corpus, args.recipe, args.patience, **overrides)
    print(json.dumps(result))
