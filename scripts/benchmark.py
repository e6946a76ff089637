"""Measure this machine: matmul peak, training throughput (Lightning vs a plain loop), generation speed, corpus prep.

    python scripts/benchmark.py                                  # everything, about 10 minutes on 2 CPU cores
    python scripts/benchmark.py --presets tiny,small --steps 3 --skip corpus   # about a minute
    python scripts/benchmark.py --only generate --presets small,base

Prints Markdown tables and writes them as JSON (--out). Numbers are comparable within one run on one machine only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from _common import ROOT
from lightning.fabric.utilities.throughput import measure_flops

from lm.data import CharDataModule, encode_corpus
from lm.generate import generate
from lm.hardware import bf16_supported, measure_matmul_peak, retain_freed_memory
from lm.model import Transformer, TransformerConfig
from lm.module import LanguageModel, cosine_schedule, parameter_groups
from lm.tokenizer import CharTokenizer

# Sizes and batch shapes as the presets in conf/ use them (base: nanoGPT's Shakespeare-char run).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, seq_length=64, batch_size=8, dropout=0.0),
    "small": dict(n_layer=4, n_head=4, n_embd=256, seq_length=128, batch_size=32, dropout=0.0),
    "base": dict(n_layer=6, n_head=6, n_embd=384, seq_length=256, batch_size=64, dropout=0.2),
}
SHAKESPEARE_ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(SHAKESPEARE_ALPHABET)


def rss_bytes() -> int:
    """Current resident memory of this process (Linux; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since it started (Linux VmHWM: unlike ru_maxrss, not inherited
    from the parent that spawned it)."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def model_config(preset: str, vocab_size: int = VOCAB_SIZE) -> TransformerConfig:
    p = PRESETS[preset]
    return TransformerConfig(
        vocab_size=vocab_size,
        seq_length=p["seq_length"],
        n_layer=p["n_layer"],
        n_head=p["n_head"],
        n_embd=p["n_embd"],
        dropout=p["dropout"],
    )


def flops_per_batch(config: TransformerConfig, batch_size: int) -> int:
    with torch.device("meta"):
        model = Transformer(config)
        x = torch.zeros(batch_size, config.seq_length, dtype=torch.long)
        return measure_flops(model, lambda: model(x), lambda y: y.sum())


def synthetic_corpus(path: Path, n_bytes: int, seed: int = 0) -> None:
    """Random text with Tiny Shakespeare's alphabet, written fast in blocks."""
    alphabet = np.frombuffer(SHAKESPEARE_ALPHABET.encode(), dtype=np.uint8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as f:
        left = n_bytes
        while left > 0:
            n = min(left, 1 << 24)
            alphabet[rng.integers(0, len(alphabet), n)].tofile(f)
            left -= n


# --------------------------------------------------------------------------------------------------------------
# Training


class StepTimer(L.Callback):
    """Wall time of each training step after `warmup` steps, plus the data-loading share and peak RSS."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.data_times, self.peak_rss = warmup, [], [], 0
        self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._end is not None and trainer.global_step > self.warmup:
            self.data_times.append(now - self._end)  # between the last step's end and this batch's arrival
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.times.append(self._end - self._start)
        self.peak_rss = max(self.peak_rss, rss_bytes())


def lightning_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path) -> dict:
    p = PRESETS[preset]
    L.seed_everything(0, verbose=False)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    config = model_config(preset, datamodule.tokenizer.vocab_size)
    module = LanguageModel(
        config,
        datamodule.tokenizer.vocab,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=True),
    )
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        max_steps=warmup + steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        precision=precision,
        gradient_clip_val=1.0,
        callbacks=[timer],
        accelerator="auto",
        devices=1,
    )
    trainer.fit(module, datamodule=datamodule)
    step = float(np.median(timer.times))
    return {
        "step_s": step,
        "data_share": float(np.median(timer.data_times)) / step if timer.data_times else 0.0,
        "peak_rss_mb": timer.peak_rss / 2**20,
    }


def plain_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path) -> dict:
    """The same model, batches, optimizer, clipping and schedule in a hand-written loop."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(model_config(preset, datamodule.tokenizer.vocab_size)).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3, weight_decay=0.1, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, 100, 5000, 0.1))

    def step(i: int) -> None:
        x, y = (t.to(device) for t in batches.batch(i))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return {"step_s": median_step_time(step, warmup, steps)}


def median_step_time(step, warmup: int, steps: int) -> float:
    """Median wall time of step(i) for i = warmup .. warmup + steps - 1, after `warmup` untimed calls."""
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step(i)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


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


def reference_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path) -> dict:
    """nanoGPT's train.py loop on its model: AdamW (fused only on CUDA, as nanoGPT does), clipping at 1.0, and for
    bf16 the autocast context nanoGPT uses on GPUs (on a CPU it trains in fp32: `nullcontext`)."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {k: p[k] for k in ("n_layer", "n_head", "n_embd", "dropout")}
    model = NanoGPTReference(datamodule.tokenizer.vocab_size, p["seq_length"], **sizes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=device == "cuda")

    def step(i: int) -> None:
        x, y = (t.contiguous().to(device) for t in batches.batch(i))  # nanoGPT's get_batch stacks rows
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return {"step_s": median_step_time(step, warmup, steps)}


def _child(target, args, retain_memory: bool, queue) -> None:
    warnings.filterwarnings("ignore")
    if retain_memory:
        retain_freed_memory()  # as scripts/train.py does (malloc_reuse=true)
    queue.put(target(*args))


def in_child(target, *args, retain_memory: bool = True):
    """Runs target(*args) in a fresh process and returns its result: every measurement starts from the same state
    (an earlier one's heap or caches cannot help or hurt it), and its peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_child, args=(target, args, retain_memory, queue))
    child.start()
    result = queue.get()
    child.join()
    return result


def bench_training(presets, precisions, steps, warmup, corpus, peaks) -> list[dict]:
    rows = []
    for preset in presets:
        p = PRESETS[preset]
        tokens = p["batch_size"] * p["seq_length"]
        flops = flops_per_batch(model_config(preset), p["batch_size"])
        for precision in precisions:
            lit = in_child(lightning_training, preset, precision, steps, warmup, corpus)
            plain = in_child(plain_training, preset, precision, steps, warmup, corpus)
            peak = peaks["bf16" if precision == "bf16-mixed" else "fp32"]
            row = {
                "preset": preset,
                "precision": precision,
                "batch": p["batch_size"],
                "context": p["seq_length"],
                "ms_per_step": 1000 * lit["step_s"],
                "tokens_per_s": tokens / lit["step_s"],
                "mfu": flops / lit["step_s"] / peak if peak else None,
                "data_share": lit["data_share"],
                "peak_rss_mb": lit["peak_rss_mb"],
                "plain_ms_per_step": 1000 * plain["step_s"],
                "lightning_overhead": lit["step_s"] / plain["step_s"] - 1,
            }
            rows.append(row)
            print(
                f"  train {preset} {precision}: {row['ms_per_step']:.0f} ms/step, {row['tokens_per_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def bench_reference(presets, steps, warmup, corpus, training_rows) -> list[dict]:
    """nanoGPT's loop in fp32 and bf16 per preset, against our fastest Lightning step of the same preset."""
    rows = []
    for preset in presets:
        ours = [r for r in training_rows if r["preset"] == preset]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ms_per_step"])
        row = {"preset": preset, "ours_precision": best["precision"], "ours_ms": best["ms_per_step"]}
        for precision, key in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
            # nanoGPT as shipped: without this project's malloc setting
            run = in_child(reference_training, preset, precision, steps, warmup, corpus, retain_memory=False)
            ms = 1000 * run["step_s"]
            row[f"nanogpt_{key}_ms"] = ms
            row[f"speedup_vs_{key}"] = ms / best["ms_per_step"]
            print(f"  nanoGPT {preset} {precision}: {ms:.0f} ms/step", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Generation


def bench_generation(presets, n_chars: int, precision: str, repeats: int = 3) -> list[dict]:
    rows = []
    tokenizer = CharTokenizer(
        "".join(sorted(set("\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")))
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for preset in presets:
        torch.manual_seed(0)
        model = Transformer(model_config(preset, tokenizer.vocab_size)).to(device).eval()
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        speeds = {}
        for kv_cache in (True, False):
            generate(model, tokenizer, "\n", 20, seed=0, kv_cache=kv_cache)  # warm-up
            times = []
            for repeat in range(repeats):  # the median of a few runs: a shared machine's noise is large
                start = time.perf_counter()
                generate(model, tokenizer, "\n", n_chars, temperature=1.0, seed=repeat, kv_cache=kv_cache)
                times.append(time.perf_counter() - start)
            speeds[kv_cache] = n_chars / float(np.median(times))
        rows.append(
            {
                "preset": preset,
                "precision": precision,
                "context": model.config.seq_length,
                "chars": n_chars,
                "chars_per_s_cache": speeds[True],
                "chars_per_s_no_cache": speeds[False],
                "cache_speedup": speeds[True] / speeds[False],
            }
        )
        print(
            f"  generate {preset} {precision}: {speeds[True]:.0f} chars/s cached, {speeds[False]:.0f} uncached",
            file=sys.stderr,
            flush=True,
        )
    return rows


# --------------------------------------------------------------------------------------------------------------
# Big corpus (in a child process, so its memory figures are its own)


def corpus_preparation(size_mb: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "big.txt"
        synthetic_corpus(path, size_mb * 2**20)
        start = time.perf_counter()
        encode_corpus(path)
        prepare_s = time.perf_counter() - start
        prepare_rss = peak_rss_bytes()
        start = time.perf_counter()
        encode_corpus(path)
        open_s = time.perf_counter() - start
        train = lightning_training("small", "bf16-mixed" if bf16_supported("cpu") else "32-true", steps, 1, path)
        return {
            "corpus_mb": size_mb,
            "prepare_s": prepare_s,
            "open_s": open_s,
            "prepare_peak_rss_mb": prepare_rss / 2**20,
            "train_peak_rss_mb": peak_rss_bytes() / 2**20,
            "train_ms_per_step": 1000 * train["step_s"],
        }


def bench_corpus(size_mb: int, steps: int) -> dict:
    return in_child(corpus_preparation, size_mb, steps)


# --------------------------------------------------------------------------------------------------------------


PERCENT_COLUMNS = {"mfu", "data_share", "lightning_overhead"}
TIMES_COLUMNS = {"speedup_vs_fp32", "speedup_vs_bf16"}


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    def fmt(key, v):
        if v is None:
            return "-"
        if key in PERCENT_COLUMNS:
            return f"{v:.1%}"
        if key in TIMES_COLUMNS:
            return f"{v:.2f}x"
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,base", help="comma-separated: tiny, small, base")
    parser.add_argument("--precisions", default="bf16-mixed,32-true", help="Lightning precisions to train in")
    parser.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--generate-chars", type=int, default=1000)
    parser.add_argument("--corpus-mb", type=int, default=100)
    parser.add_argument(
        "--only", default="peak,train,reference,generate,corpus", help="which parts to run (reference needs train)"
    )
    parser.add_argument("--skip", default="", help="parts to leave out")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmark.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    parts = [p for p in args.only.split(",") if p not in args.skip.split(",")]
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in PRESETS:
            parser.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    report = {
        "machine": {
            "cpu": cpu,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "native_bf16": bf16_supported(device),
        }
    }
    print(
        f"# Benchmark on {report['machine']['device']} ({cpu}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__})\n"
    )

    peaks = {"bf16": None, "fp32": None}
    if "peak" in parts or "train" in parts:
        peaks = {
            "bf16": measure_matmul_peak(torch.bfloat16, device),
            "fp32": measure_matmul_peak(torch.float32, device),
        }
        report["matmul_peak_flops"] = peaks
        print(
            f"Matrix-multiply peak (2048x2048): bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s, "
            f"fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s\n"
        )

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        synthetic_corpus(corpus, 2 * 2**20)
        if "train" in parts:
            precisions = [p for p in args.precisions.split(",") if p]
            rows = bench_training(presets, precisions, args.steps, args.warmup, corpus, peaks)
            report["training"] = rows
            print("## Training step (Lightning, as scripts/train.py runs it) vs a plain PyTorch loop\n")
            print(
                markdown(
                    rows,
                    {
                        "preset": "preset",
                        "precision": "precision",
                        "batch": "batch",
                        "context": "context",
                        "ms_per_step": "ms/step",
                        "tokens_per_s": "tokens/s",
                        "mfu": "MFU",
                        "data_share": "data time",
                        "peak_rss_mb": "peak RSS MB",
                        "plain_ms_per_step": "plain loop ms/step",
                        "lightning_overhead": "Lightning overhead",
                    },
                )
                + "\n"
            )
            if "reference" in parts:
                rows = bench_reference(presets, args.steps, args.warmup, corpus, rows)
                report["reference"] = rows
                print("## Against nanoGPT's model and training loop (plain PyTorch), same sizes and batches\n")
                print(
                    markdown(
                        rows,
                        {
                            "preset": "preset",
                            "ours_precision": "ours: precision",
                            "ours_ms": "ours: ms/step",
                            "nanogpt_fp32_ms": "nanoGPT fp32 ms/step",
                            "nanogpt_bf16_ms": "nanoGPT bf16 autocast ms/step",
                            "speedup_vs_fp32": "speed-up vs fp32",
                            "speedup_vs_bf16": "speed-up vs bf16",
                        },
                    )
                    + "\n"
                )
    if "generate" in parts:
        rows = bench_generation(presets, args.generate_chars, "fp32")
        report["generation"] = rows
        print(f"## Generation of {args.generate_chars} characters (batch 1, fp32)\n")
        print(
            markdown(
                rows,
                {
                    "preset": "preset",
                    "context": "context",
                    "chars_per_s_cache": "chars/s, KV cache",
                    "chars_per_s_no_cache": "chars/s, no cache",
                    "cache_speedup": "cache speed-up",
                },
            )
            + "\n"
        )
    if "corpus" in parts:
        row = bench_corpus(args.corpus_mb, args.steps)
        report["corpus"] = row
        print(f"## A {args.corpus_mb} MB corpus\n")
        print(
            markdown(
                [row],
                {
                    "prepare_s": "prepare s (once)",
                    "open_s": "open s (cached)",
                    "prepare_peak_rss_mb": "peak RSS preparing MB",
                    "train_peak_rss_mb": "peak RSS training (small) MB",
                    "train_ms_per_step": "ms/step",
                },
            )
            + "\n"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
