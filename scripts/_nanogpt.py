"""nanoGPT (github.com/karpathy/nanoGPT), condensed: its model.py and its train.py loop with the settings of its
documented CPU recipe for Tiny Shakespeare, the baseline `scripts/benchmark.py` measures this project against:

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
        --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
        --dropout=0.0

As a script it runs that recipe in a fresh process and prints its losses as JSON (only torch and numpy are
imported, as in nanoGPT, so its start-up time is nanoGPT's own):

    python scripts/_nanogpt.py data/tinyshakespeare.txt [--max-iters 2000]

Left out: checkpoint writing (nanoGPT saves a ~3 MB ckpt.pt when the validation estimate improves), wandb, DDP.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# config/train_shakespeare_char.py with the command line above (fp32 on a CPU: nanoGPT's `nullcontext`)
CPU_RECIPE = dict(
    n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, dropout=0.0, learning_rate=1e-3,
    max_iters=2000, lr_decay_iters=2000, min_lr=1e-4, warmup_iters=100, beta1=0.9, beta2=0.99, weight_decay=0.1,
    grad_clip=1.0, eval_interval=250, eval_iters=20, seed=1337,
)  # fmt: skip


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


def train_recipe(corpus: Path, **overrides) -> dict:
    """nanoGPT's train.py loop on its prepare.py split (first 90% train, last 10% val) of `corpus`.

    Returns the validation estimates (nanoGPT's own: the mean loss of `eval_iters` random batches) by iteration,
    with the seconds since the process started.
    """
    r = {**CPU_RECIPE, **overrides}
    torch.manual_seed(r["seed"])
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
        return x, y

    model = NanoGPTReference(len(chars), T, r["n_layer"], r["n_head"], r["n_embd"], r["dropout"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": r["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=r["learning_rate"], betas=(r["beta1"], r["beta2"]))

    @torch.no_grad()
    def estimate_loss() -> dict:
        model.eval()
        out = {name: float(np.mean([model(*get_batch(name)).item() for _ in range(r["eval_iters"])])) for name in data}
        model.train()
        return out

    evals = []
    x, y = get_batch("train")
    for it in range(r["max_iters"] + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, r)
        if it % r["eval_interval"] == 0 or it == r["max_iters"]:
            losses = estimate_loss()
            evals.append({"iter": it, "seconds": time.perf_counter() - START, **losses})
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", file=sys.stderr)
        if it == r["max_iters"]:
            break
        loss = model(x, y)
        x, y = get_batch("train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # nanoGPT logs every iteration (log_interval=1), which syncs like this
    return {"recipe": r, "evals": evals, "val_loss": evals[-1]["val"], "seconds": time.perf_counter() - START}


START = time.perf_counter()

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", type=Path)
    parser.add_argument("--max-iters", type=int, default=CPU_RECIPE["max_iters"], help="lr_decay_iters follows it")
    args = parser.parse_args()
    result = train_recipe(args.corpus, max_iters=args.max_iters, lr_decay_iters=args.max_iters)
    print(json.dumps(result))
