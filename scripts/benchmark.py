"""Measure this machine: matmul peak, training throughput (Lightning vs a plain loop, ours vs nanoGPT's), whole runs
against nanoGPT's recipe, generation speed, corpus preparation.

    python scripts/benchmark.py                                  # on 2 CPU cores about 10 minutes; on a GPU, its
                                                                 # own set (base, compiled, whole runs), for 5 min
    python scripts/benchmark.py --presets tiny,small --steps 3 --skip corpus   # about a minute
    python scripts/benchmark.py --only generate --presets mini,small,base
    python scripts/benchmark.py --only run     # our default run vs nanoGPT's recipe, to the best (~6 min on a CPU)
    python scripts/benchmark.py --only quality                   # our default vs nanoGPT's CPU recipe, ~15 minutes

Prints Markdown tables and writes them as JSON (--out). Numbers are comparable within one run on one machine only.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import queue as queue_module
import resource
import shlex
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from _benchmark_runs import bench_quality, bench_run
from _common import ROOT
from _nanogpt import NanoGPTReference
from lightning.fabric.utilities.throughput import measure_flops

from lm.data import CharDataModule, encode_corpus
from lm.decoding import decode_linear, decoding_matrices
from lm.generate import generate
from lm.hardware import bf16_supported, measure_matmul_peak, retain_freed_memory
from lm.model import Transformer, TransformerConfig
from lm.module import LanguageModel, cosine_schedule
from lm.optim import parameter_groups
from lm.tokenizer import CharTokenizer

# Sizes and batch shapes as the presets in conf/ use them (mini: the CPU default run's, CPU_RECIPE in train.py;
# base: nanoGPT's Shakespeare-char run).
PRESETS = {
    "tiny": dict(n_layer=2, n_head=2, n_embd=32, seq_length=64, batch_size=8, dropout=0.0),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, seq_length=128, batch_size=8, dropout=0.0),
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
    """Wall time of each training step after `warmup` steps, plus the data-loading share and peak RSS. On a GPU
    each step waits for the device at its end (as the reference loops' `loss.item()` does), so its time is the GPU's."""

    def __init__(self, warmup: int):
        self.warmup, self.times, self.data_times, self.peak_rss = warmup, [], [], 0
        self._end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._end is not None and trainer.global_step > self.warmup:
            self.data_times.append(now - self._end)  # between the last step's end and this batch's arrival
        self._start = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._end = time.perf_counter()
        if trainer.global_step > self.warmup:
            self.times.append(self._end - self._start)
        self.peak_rss = max(self.peak_rss, rss_bytes())


def lightning_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path, compile: bool) -> dict:
    """Our training step as scripts/train.py runs it (Lightning, AdamW, clipping; compiled as model.compile=true)."""
    p = PRESETS[preset]
    L.seed_everything(0, verbose=False)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    config = model_config(preset, datamodule.tokenizer.vocab_size)
    module = LanguageModel(
        config,
        datamodule.tokenizer.vocab,
        optimizer=lambda groups: torch.optim.AdamW(groups, lr=1e-3, weight_decay=0.1, fused=True),
    )
    if compile:
        module.model.compile()  # as train.py does: in place, compiled on the first step (a warm-up step)
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
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def plain_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path, compile: bool) -> dict:
    """The same model, batches, optimizer, clipping and schedule in a hand-written loop."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(model_config(preset, datamodule.tokenizer.vocab_size)).to(device)
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3, weight_decay=0.1, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, 100, 5000, 0.1))
    if compile:
        model.compile()

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


def reference_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path, compile: bool) -> dict:
    """nanoGPT's train.py loop on its model: AdamW (fused only on CUDA, as nanoGPT does), clipping at 1.0, for bf16
    the autocast context nanoGPT uses on GPUs (on a CPU it trains in fp32: `nullcontext`), and `torch.compile` as
    its compile=True (its default, which its CPU recipe turns off)."""
    p = PRESETS[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=p["seq_length"], batch_size=p["batch_size"])
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = {k: p[k] for k in ("n_layer", "n_head", "n_embd", "dropout")}
    model = NanoGPTReference(datamodule.tokenizer.vocab_size, p["seq_length"], **sizes).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), fused=device == "cuda")
    if compile:
        model = torch.compile(model)

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
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")  # TF32, as scripts/train.py and nanoGPT set it on a GPU
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
    while True:
        alive = child.is_alive()  # read before waiting: a result sent just before the child ended is still read
        try:
            result = queue.get(timeout=1)
            break
        except queue_module.Empty:
            if not alive:  # it failed (its traceback is above) or was killed: say so, do not wait forever
                sys.exit(f"error: the measurement {target.__name__}{args} ended without a result ({child.exitcode}).")
    child.join()
    return result


def bench_training(presets, precisions, steps, warmup, corpus, peaks, compile: bool, plain: bool) -> list[dict]:
    """Our Lightning step per preset and precision, and with `plain` the same step in a hand-written loop."""
    rows = []
    for preset in presets:
        p = PRESETS[preset]
        tokens = p["batch_size"] * p["seq_length"]
        flops = flops_per_batch(model_config(preset), p["batch_size"])
        for precision in precisions:
            lit = in_child(lightning_training, preset, precision, steps, warmup, corpus, compile)
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
                "peak_gpu_mb": lit["peak_gpu_mb"],
                "compiled": compile,
            }
            if plain:
                loop = in_child(plain_training, preset, precision, steps, warmup, corpus, compile)
                row["plain_ms_per_step"] = 1000 * loop["step_s"]
                row["lightning_overhead"] = lit["step_s"] / loop["step_s"] - 1
            rows.append(row)
            print(
                f"  train {preset} {precision}: {row['ms_per_step']:.0f} ms/step, {row['tokens_per_s']:.0f} tok/s",
                file=sys.stderr,
                flush=True,
            )
    return rows


def bench_reference(presets, precisions, steps, warmup, corpus, training_rows, compile: bool) -> list[dict]:
    """nanoGPT's loop in fp32 and bf16 per preset, against our fastest Lightning step of the same preset; with
    `compile`, both compiled."""
    rows = []
    for preset in presets:
        ours = [r for r in training_rows if r["preset"] == preset]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["ms_per_step"])
        row = {
            "preset": preset,
            "compiled": compile,
            "ours_precision": best["precision"],
            "ours_ms": best["ms_per_step"],
        }
        for precision, key in (("32-true", "fp32"), ("bf16-mixed", "bf16")):
            if precision not in precisions:
                continue
            # nanoGPT as shipped: without this project's malloc setting
            run = in_child(reference_training, preset, precision, steps, warmup, corpus, compile, retain_memory=False)
            ms = 1000 * run["step_s"]
            row[f"nanogpt_{key}_ms"] = ms
            row[f"speedup_vs_{key}"] = ms / best["ms_per_step"]
            print(f"  nanoGPT {preset} {precision}: {ms:.0f} ms/step", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Generation


def weight_pass_seconds(model: Transformer, matrices: dict | None = None, rows: int = 1, repeats: int = 50) -> float:
    """One pass over the weights, as a decoding step makes it: a product of `rows` rows with every weight matrix
    (through `decode_linear`, as the step does; with `matrices`, the float16 versions that steps use on a CPU). With
    one row, no step can be faster than this: the limit of batch-1 decoding."""
    matrices = matrices or {}
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {
        m.in_features: torch.ones(rows, m.in_features, device=m.weight.device, dtype=m.weight.dtype) for m in linears
    }

    def one_pass():
        for m in linears:
            decode_linear(inputs[m.in_features], m, matrices.get(m))

    with torch.inference_mode():
        return median_step_time(lambda i: one_pass(), 5, repeats)


def alternated_chars_per_second(model, tokenizer, n_chars: int, repeats: int, variants: dict[str, dict]) -> dict:
    """Total characters per second of each variant (`generate` keyword arguments), the variants run in turn
    `repeats` times after a warm-up each (with compile=True, also the compilation), so that a shared machine's slow
    and fast minutes fall on all of them: {name: [chars/s of each round]}."""
    for kwargs in variants.values():
        generate(model, tokenizer, "\n", 20, seed=0, **kwargs)
    rates = {name: [] for name in variants}
    for repeat in range(repeats):
        for name, kwargs in variants.items():
            start = time.perf_counter()
            generate(model, tokenizer, "\n", n_chars, temperature=1.0, seed=repeat, **kwargs)
            rates[name].append(n_chars * kwargs.get("num_samples", 1) / (time.perf_counter() - start))
    return rates


def chars_per_second(model, tokenizer, n_chars: int, repeats: int, **kwargs) -> float:
    """Total characters per second (all samples), the median of `repeats` runs after a warm-up."""
    return float(np.median(alternated_chars_per_second(model, tokenizer, n_chars, repeats, {"": kwargs})[""]))


def bench_generation(presets, n_chars: int, precision: str, repeats: int = 3, pairs: int = 5) -> list[dict]:
    """Characters per second of one stream and of eight, with the KV cache. On a GPU both take the compiled step (a
    CUDA graph: generate.py's compile=true), beside one eager stream; on a CPU the eager step (generate.py's default:
    compiling costs seconds and pays only for long texts there), beside the compiled one, and the CPU decoding
    study: exact mode, no cache, passes over the weights."""
    rows = []
    tokenizer = CharTokenizer("".join(sorted(set(SHAKESPEARE_ALPHABET))))
    cuda = torch.cuda.is_available()
    for preset in presets:
        torch.manual_seed(0)
        model = Transformer(model_config(preset, tokenizer.vocab_size)).to("cuda" if cuda else "cpu").eval()
        if precision == "bf16":
            model = model.to(torch.bfloat16)
        start = time.perf_counter()
        generate(model, tokenizer, "\n", 2, compile=True)  # the second character takes the compiled step
        compile_s = time.perf_counter() - start
        streams = {"compile": True} if cuda else {}
        # one and eight streams alternated: their ratio is the median of `pairs` side-by-side ratios
        variants = {"one": streams, "eight": {"num_samples": 8, **streams}}
        rates = alternated_chars_per_second(model, tokenizer, n_chars, pairs, variants)
        one = float(np.median(rates["one"]))
        row = {
            "preset": preset,
            "precision": precision,
            "context": model.config.seq_length,
            "chars": n_chars,
            "streams_compiled": cuda,
            "chars_per_s_cache": chars_per_second(model, tokenizer, n_chars, repeats) if cuda else one,
            "chars_per_s_compiled": one if cuda else chars_per_second(model, tokenizer, n_chars, repeats, compile=True),
            "compile_s": compile_s,
            "chars_per_s_8_streams": float(np.median(rates["eight"])),
        }
        ratios = [eight / one for one, eight in zip(rates["one"], rates["eight"], strict=True)]
        row["streams_speedup"] = float(np.median(ratios))
        row["streams_speedup_range"] = [min(ratios), max(ratios)]
        if not cuda:
            row.update(cpu_decoding_study(model, tokenizer, n_chars, repeats, one))
        rows.append(row)
        print(
            f"  generate {preset} {precision}: {row['chars_per_s_cache']:.0f} chars/s eager, "
            f"{row['chars_per_s_compiled']:.0f} compiled (compiling took {compile_s:.1f} s), "
            f"{row['chars_per_s_8_streams']:.0f} in 8 streams ({row['streams_speedup']:.2f}x one, median of "
            f"{pairs} pairs)",
            file=sys.stderr,
            flush=True,
        )
    return rows


def cpu_decoding_study(model: Transformer, tokenizer: CharTokenizer, n_chars: int, repeats: int, cached: float) -> dict:
    """What sets a CPU's decoding pace: exact mode and no cache against the cache, and one pass over the weights
    as one stream and as eight read them (the float16 copies of lm.decoding.decoding_matrices; FBGEMM's for 8)."""
    row = {
        "chars_per_s_exact": chars_per_second(model, tokenizer, n_chars, repeats, exact=True),
        "chars_per_s_no_cache": chars_per_second(model, tokenizer, n_chars, repeats, kv_cache=False),
        "weight_pass_ms": 1000 * weight_pass_seconds(model),
        "weight_pass_one_stream_ms": 1000 * weight_pass_seconds(model, decoding_matrices(model, 1)),
        "weight_pass_8_rows_ms": 1000 * weight_pass_seconds(model, rows=8),
        "weight_pass_8_streams_ms": 1000 * weight_pass_seconds(model, decoding_matrices(model, 8), rows=8),
    }
    row["limit_chars_per_s"] = 1000 / row["weight_pass_one_stream_ms"]
    row["cache_speedup"] = cached / row["chars_per_s_no_cache"]
    print(
        f"  generate (CPU decoding): {row['chars_per_s_exact']:.0f} chars/s exact, {row['chars_per_s_no_cache']:.0f} "
        f"uncached; weight pass {row['weight_pass_ms']:.2f} ms ({row['weight_pass_one_stream_ms']:.2f} ms as one "
        f"stream reads them); 8 rows {row['weight_pass_8_rows_ms']:.2f} ms ({row['weight_pass_8_streams_ms']:.2f} "
        "ms as 8 streams read them)",
        file=sys.stderr,
        flush=True,
    )
    return row


def reached_nanogpt(ours: dict, nanogpt: dict) -> str:
    """A sentence on when our run first reached nanoGPT's best validation loss."""
    if ours["time_to_nanogpt_best_s"] is None:
        return f"Ours never reached nanoGPT's best loss ({nanogpt['best_val_loss']:.4f})."
    return (
        f"Ours reached nanoGPT's best loss ({nanogpt['best_val_loss']:.4f}) by step {ours['step_to_nanogpt_best']}, "
        f"{ours['time_to_nanogpt_best_s']:.1f} s from launch (its first validation at or below it), "
        f"{ours['time_to_nanogpt_best_s'] / nanogpt['time_to_best_s']:.2f}x nanoGPT's time."
    )


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
        precision = "bf16-mixed" if bf16_supported("cpu") else "32-true"
        train = lightning_training("small", precision, steps, 1, path, compile=False)
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


PERCENT_COLUMNS = {"mfu", "data_share", "lightning_overhead", "validation_share", "after_validation_share"}
LOSS_COLUMNS = {"val_loss", "best_val_loss", "last_val_loss"}
TIMES_COLUMNS = {"speedup_vs_fp32", "speedup_vs_bf16", "cache_speedup", "streams_speedup"}


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    def fmt(key, v):
        if v is None:
            return "-"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if key in PERCENT_COLUMNS:
            return f"{v:.1%}"
        if key in LOSS_COLUMNS:
            return f"{v:.4f}"
        if key in TIMES_COLUMNS:
            return f"{v:.2f}x"
        if isinstance(v, float):
            return f"{v:,.2f}" if abs(v) < 10 else f"{v:,.0f}"
        return str(v)

    columns = {k: v for k, v in columns.items() if any(r.get(k) is not None for r in rows)}  # what was measured
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(k, r.get(k)) for k in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_table(title: str, rows: list[dict], columns: dict[str, str]) -> None:
    print(f"## {title}\n\n{markdown(rows, columns)}\n")


# Each table's columns: {key in the rows: heading}; a column no row measured is left out.
TRAINING_COLUMNS = {
    "preset": "preset",
    "precision": "precision",
    "compiled": "compiled",
    "batch": "batch",
    "context": "context",
    "ms_per_step": "ms/step",
    "tokens_per_s": "tokens/s",
    "mfu": "MFU",
    "data_share": "data time",
    "peak_rss_mb": "peak RSS MB",
    "peak_gpu_mb": "peak GPU MB",
    "plain_ms_per_step": "plain loop ms/step",
    "lightning_overhead": "Lightning overhead",
}
REFERENCE_COLUMNS = {
    "preset": "preset",
    "compiled": "both compiled",
    "ours_precision": "ours: precision",
    "ours_ms": "ours: ms/step",
    "nanogpt_fp32_ms": "nanoGPT fp32 ms/step",
    "nanogpt_bf16_ms": "nanoGPT bf16 autocast ms/step",
    "speedup_vs_fp32": "speed-up vs fp32",
    "speedup_vs_bf16": "speed-up vs bf16",
}
RUN_COLUMNS = {
    "run": "run",
    "best_val_loss": "best val loss",
    "best_step": "at step",
    "time_to_best_s": "s from launch to it",
    "time_to_nanogpt_best_s": "s to nanoGPT's best loss",
    "last_val_loss": "last val loss",
    "steps": "steps",
    "wall_s": "process wall s",
    "compile_s": "compiling s",
    "validation_share": "validation, share of wall",
    "after_validation_share": "of which samples and checkpoint calls",
}
GENERATION_COLUMNS = {
    "preset": "preset",
    "context": "context",
    "chars_per_s_cache": "chars/s, KV cache",
    "chars_per_s_exact": "chars/s, KV cache, exact",
    "chars_per_s_compiled": "chars/s, compiled step",
    "compile_s": "compile s",
    "chars_per_s_8_streams": "chars/s, 8 streams (total)",
    "streams_speedup": "8 streams / one",
    "chars_per_s_no_cache": "chars/s, no cache",
    "weight_pass_ms": "one pass over the weights, ms",
    "weight_pass_one_stream_ms": "the same as one stream reads them, ms",
    "limit_chars_per_s": "limit chars/s (batch 1)",
    "weight_pass_8_rows_ms": "a pass with 8 rows, ms",
    "weight_pass_8_streams_ms": "the same as 8 streams read them, ms",
}
CORPUS_COLUMNS = {
    "prepare_s": "prepare s (once)",
    "open_s": "open s (cached)",
    "prepare_peak_rss_mb": "peak RSS preparing MB",
    "train_peak_rss_mb": "peak RSS training (small) MB",
    "train_ms_per_step": "ms/step",
}


# What a plain `python scripts/benchmark.py` measures: on a CPU every preset and the CPU's own studies (about 10
# minutes on 2 cores); on a GPU, meant to fit 5 minutes, what a GPU user asks: nanoGPT's size compiled against nanoGPT
# compiled, our default run against nanoGPT's recipe, sampling. Compiled where each project compiles by default:
# ours on CUDA only (model.compile=auto), nanoGPT on a GPU (its compile=True; its CPU recipe turns it off).
DEFAULTS = {
    "cpu": dict(presets="tiny,mini,small,base", only="peak,train,plain,reference,generate,corpus", steps=5, warmup=2),
    "cuda": dict(presets="base", only="peak,train,reference,run,generate", steps=50, warmup=10),
}
PARTS = ("peak", "train", "plain", "reference", "run", "generate", "corpus", "quality")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = DEFAULTS[device]
    parser.add_argument("--presets", default=defaults["presets"], help="comma-separated: tiny, mini, small, base")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="Lightning precisions to train in; auto: on a GPU bf16-mixed (what runs use there); on a CPU bf16-mixed "
        "and 32-true where it has native bf16, else 32-true only (emulated bf16 is ~100x slower than fp32 there)",
    )
    parser.add_argument(
        "--compile", choices=("auto", "true", "false"), default="auto", help="auto: compiled on CUDA only"
    )
    parser.add_argument("--steps", type=int, default=defaults["steps"], help="timed training steps per configuration")
    parser.add_argument("--warmup", type=int, default=defaults["warmup"], help="untimed steps first (compiling)")
    parser.add_argument("--generate-chars", type=int, default=1000)
    parser.add_argument("--corpus-mb", type=int, default=100)
    parser.add_argument(
        "--only",
        default=defaults["only"],
        help=f"which parts to run, of {', '.join(PARTS)} (plain and reference need train); quality (about 15 "
        f"minutes on a slow CPU) runs only when named; default here: {defaults['only']}",
    )
    parser.add_argument("--skip", default="", help="parts to leave out")
    parser.add_argument("--run-corpus", type=Path, help="run: the corpus of both runs (default Tiny Shakespeare)")
    parser.add_argument("--train-args", default="", help='run: overrides for our run, e.g. "trainer.max_steps=1000"')
    parser.add_argument(
        "--nanogpt-args",
        default="",
        help='run: options for scripts/_nanogpt.py, given with "=": --nanogpt-args="--set eval_iters=50"',
    )
    parser.add_argument("--patience", type=int, default=2, help="run: stop nanoGPT this many evaluations past its best")
    parser.add_argument("--out", default=str(ROOT / "outputs" / "benchmark.json"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    parts = [p for p in args.only.split(",") if p and p not in args.skip.split(",")]
    for part in parts:
        if part not in PARTS:
            parser.error(f"unknown part {part!r} in --only; choose from {', '.join(PARTS)}")
    presets = [p for p in args.presets.split(",") if p]
    for p in presets:
        if p not in PRESETS:
            parser.error(f"unknown preset {p!r}; choose from {', '.join(PRESETS)}")
    compile = device == "cuda" if args.compile == "auto" else args.compile == "true"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as scripts/train.py sets it on a GPU
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

    precisions = [p for p in args.precisions.split(",") if p]
    if precisions == ["auto"]:
        if device == "cuda":
            precisions = ["bf16-mixed"] if bf16_supported(device) else ["32-true"]
        else:
            precisions = ["bf16-mixed", "32-true"] if bf16_supported(device) else ["32-true"]
            if not bf16_supported(device):
                print("No native bf16 here: bf16 is left out (--precisions bf16-mixed,32-true to measure it anyway).\n")
    peaks = {"bf16": None, "fp32": None}
    if "peak" in parts or "train" in parts:
        peaks = {
            "bf16": measure_matmul_peak(torch.bfloat16, device) if "bf16-mixed" in precisions else None,
            "fp32": measure_matmul_peak(torch.float32, device),
        }
        report["matmul_peak_flops"] = peaks
        bf16 = f"bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s, " if peaks["bf16"] else ""
        print(f"Matrix-multiply peak (2048x2048): {bf16}fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s\n")

    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        synthetic_corpus(corpus, 2 * 2**20)
        if "train" in parts:
            plain = "plain" in parts
            rows = bench_training(presets, precisions, args.steps, args.warmup, corpus, peaks, compile, plain)
            report["training"] = rows
            title = "Training step (Lightning, as scripts/train.py runs it)" + (" vs a plain PyTorch loop" * plain)
            print_table(title, rows, TRAINING_COLUMNS)
            if "reference" in parts:
                rows = bench_reference(presets, precisions, args.steps, args.warmup, corpus, rows, compile)
                report["reference"] = rows
                title = "Against nanoGPT's model and training loop (plain PyTorch), same sizes and batches"
                print_table(title, rows, REFERENCE_COLUMNS)
    if "run" in parts:
        print("  run: ours, then nanoGPT's recipe", file=sys.stderr, flush=True)
        out_dir = Path(args.out).parent / "run"
        train_args, nanogpt_args = shlex.split(args.train_args), shlex.split(args.nanogpt_args)
        run = bench_run(out_dir, args.run_corpus, train_args, nanogpt_args, args.patience)
        report["run"] = run
        ours, nanogpt = run["rows"]
        title = "Our default run against nanoGPT's recipe (fresh processes, start-up and compiling included)"
        print_table(title, run["rows"], RUN_COLUMNS)
        print(
            "Ours: over the whole validation split. nanoGPT: its own estimate (the mean of eval_iters random "
            "batches).\n"
            f"From launch to its best validation loss: ours {ours['time_to_best_s']:.1f} s, nanoGPT "
            f"{nanogpt['time_to_best_s']:.1f} s. {reached_nanogpt(ours, nanogpt)}\n"
        )
    if "generate" in parts:
        rows = bench_generation(presets, args.generate_chars, "fp32")
        report["generation"] = rows
        streams = "compiled step" if device == "cuda" else "KV cache"
        columns = {**GENERATION_COLUMNS, "chars_per_s_8_streams": f"chars/s, 8 streams (total, {streams})"}
        print_table(f"Generation of {args.generate_chars} characters (fp32, sampling at temperature 1)", rows, columns)
    if "quality" in parts:
        quality = bench_quality(Path(args.out).parent / "quality")
        report["quality"] = quality
        title = "Validation loss at equal wall time (Tiny Shakespeare, start-up included)"
        print_table(title, quality["rows"], {"run": "run", "wall_s": "wall s", "val_loss": "val loss"})
        print(
            "Ours: over the whole validation split. nanoGPT: its own estimate (mean of 20 random batches of 12 x 64).\n"
            f"Ours lower by {quality['gain_at_nanogpt_time']:.3f} nats at nanoGPT's wall time and "
            f"{quality['gain_at_default_time']:.3f} at the default run's.\n"
        )
    if "corpus" in parts:
        row = bench_corpus(args.corpus_mb, args.steps)
        report["corpus"] = row
        print_table(f"A {args.corpus_mb} MB corpus", [row], CORPUS_COLUMNS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
