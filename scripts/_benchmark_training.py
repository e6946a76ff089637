"""The benchmark's training parts: our Lightning step (through `lm.train.train`, as `scripts/train.py` runs it)
against the same step in a plain loop and nanoGPT's, and preparing a large corpus. Each measurement runs in a
fresh process (`in_child`)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_module
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
from _nanogpt import NanoGPTReference
from lightning.fabric.utilities.throughput import measure_flops

from lm.config import compose_config
from lm.corpus import encode_corpus
from lm.data import CharDataModule
from lm.hardware import bf16_supported, retain_freed_memory
from lm.model import Transformer, TransformerConfig
from lm.module import cosine_schedule
from lm.optim import parameter_groups
from lm.train import model_config, train

# The batch each size is measured with (context, rows): the batch it trains with in its recipe (tiny: debug=default;
# mini: the CPU recipe, conf/recipes.yaml; small: the data group's default; base: nanoGPT's Shakespeare run). The
# sizes themselves come from conf/model/.
SHAPES = {"tiny": (64, 8), "mini": (128, 8), "small": (128, 32), "base": (256, 64)}
SHAKESPEARE_ALPHABET = "\n !$&',-.3:;?ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
VOCAB_SIZE = len(SHAKESPEARE_ALPHABET)


def preset_config(preset: str, vocab_size: int = VOCAB_SIZE) -> TransformerConfig:
    """conf/model/<preset>.yaml's model at its benchmark context (Hydra's compose API)."""
    cfg = compose_config([f"model={preset}", f"data.seq_length={SHAPES[preset][0]}"])
    return model_config(cfg, vocab_size)[0]


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
    """Our training step as `python scripts/train.py` runs it, through the package's run path (`lm.train.train`):
    AdamW, clipping, compiled as model.compile=true; no validation, checkpoints, loggers or other callbacks."""
    seq_length, batch_size = SHAPES[preset]
    timer = StepTimer(warmup)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = compose_config(
            [
                f"model={preset}",
                f"model.compile={str(compile).lower()}",
                f"data.path={corpus}",
                f"data.seq_length={seq_length}",
                f"data.batch_size={batch_size}",
                "optimizer=adamw",
                "optimizer.lr=1e-3",
                f"trainer.precision={precision}",
                f"trainer.max_steps={warmup + steps}",
                "trainer.limit_val_batches=0",
                "trainer.enable_progress_bar=false",
                "+trainer.enable_checkpointing=false",
                "~callbacks",
                "~logger",
                "seed=0",
                f"paths.run_dir={run_dir}",
            ]
        )
        train(cfg, callbacks=[timer])
    step = float(np.median(timer.times))
    return {
        "step_s": step,
        "data_share": float(np.median(timer.data_times)) / step if timer.data_times else 0.0,
        "peak_rss_mb": timer.peak_rss / 2**20,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    }


def plain_step(model: Transformer, precision: str, device: str, compile: bool):
    """The plain loop's training step for `model`: AdamW, clipping at 1.0 and the cosine schedule, as our run path
    sets them up; returns step(x, y), which ends by reading the loss (on a GPU, waiting for the step)."""
    optimizer = torch.optim.AdamW(parameter_groups(model), lr=1e-3, weight_decay=0.1, fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_schedule(s, 100, 5000, 0.1))
    if compile:
        model.compile()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()

    return step


def plain_training(preset: str, precision: str, steps: int, warmup: int, corpus: Path, compile: bool) -> dict:
    """The same model, batches, optimizer, clipping and schedule in a hand-written loop."""
    seq_length, batch_size = SHAPES[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=seq_length, batch_size=batch_size)
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = Transformer(preset_config(preset, datamodule.tokenizer.vocab_size)).to(device)
    train_step = plain_step(model, precision, device, compile)

    def step(i: int) -> None:
        train_step(*(t.to(device) for t in batches.batch(i)))

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
    seq_length, batch_size = SHAPES[preset]
    torch.manual_seed(0)
    datamodule = CharDataModule(path=str(corpus), seq_length=seq_length, batch_size=batch_size)
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = preset_config(preset)
    sizes = {k: getattr(config, k) for k in ("n_layer", "n_head", "n_embd", "dropout")}
    model = NanoGPTReference(datamodule.tokenizer.vocab_size, seq_length, **sizes).to(device)
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
        retain_freed_memory()  # as a training run does (malloc_reuse=true)
    queue.put(target(*args))


def in_child(target, *args, retain_memory: bool = True):
    """Runs target(*args) in a fresh process and returns its result: every measurement starts from the same state
    (an earlier one's heap or caches cannot help or hurt it), and its peak memory is its own."""
    # children fork from a server that imported torch and Lightning once: seconds each fresh interpreter would spend
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "lightning", "_benchmark_training"])
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
        seq_length, batch_size = SHAPES[preset]
        tokens = batch_size * seq_length
        flops = flops_per_batch(preset_config(preset), batch_size)
        for precision in precisions:
            lit = in_child(lightning_training, preset, precision, steps, warmup, corpus, compile)
            peak = peaks["bf16" if precision == "bf16-mixed" else "fp32"]
            row = {
                "preset": preset,
                "precision": precision,
                "batch": batch_size,
                "context": seq_length,
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


# The techniques part: each model option of lm/model.py alone, and the modern recipe's block with all of them
TECHNIQUES = {
    "default (GPT-2 block)": {},
    "norm=rmsnorm": {"norm": "rmsnorm"},
    "norm_position=post": {"norm_position": "post"},
    "mlp=relu": {"mlp": "relu"},
    "mlp=relu2": {"mlp": "relu2"},
    "mlp=swiglu": {"mlp": "swiglu"},
    "qk_norm=true": {"qk_norm": True},
    "tie_embeddings=false": {"tie_embeddings": False},
    "logit_softcap=30": {"logit_softcap": 30.0},
    "all: rmsnorm, relu2, qk_norm, untied, softcap": {
        "norm": "rmsnorm",
        "mlp": "relu2",
        "qk_norm": True,
        "tie_embeddings": False,
        "logit_softcap": 30.0,
    },
}


def interleaved_techniques(
    preset: str, precision: str, rounds: int, warmup: int, corpus: Path, compile: bool, options: dict | None = None
) -> dict:
    """Every model option of `options` (TECHNIQUES by default; the first is the baseline) in one process, one
    training step each in turn (the plain loop's step: AdamW, clipping, schedule), for `warmup` untimed rounds and
    then `rounds` timed ones. Each option's cost is the median over rounds of its step time over the baseline's in
    the same round: a CPU's speed drifts by 20-30% over seconds to minutes, which separate runs (even alternated)
    charged to whichever option ran then. The order rotates every round so that no option always follows the same
    one."""
    seq_length, batch_size = SHAPES[preset]
    datamodule = CharDataModule(path=str(corpus), seq_length=seq_length, batch_size=batch_size)
    batches = datamodule.train_dataloader().dataset
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = preset_config(preset, datamodule.tokenizer.vocab_size)
    steps = {}
    options = options or TECHNIQUES
    for name, settings in options.items():
        torch.manual_seed(0)
        model = Transformer(dataclasses.replace(base, **settings)).to(device)
        steps[name] = plain_step(model, precision, device, compile)

    def step(name: str, i: int) -> float:
        x, y = (t.to(device) for t in batches.batch(i))
        start = time.perf_counter()
        steps[name](x, y)
        return time.perf_counter() - start

    names = list(options)
    times = {name: [] for name in names}
    for i in range(warmup + rounds):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            elapsed = step(name, i)
            if i >= warmup:
                times[name].append(elapsed)
    default = np.array(times[names[0]])
    return {
        name: {"step_s": float(np.median(times[name])), "vs_default": float(np.median(np.array(times[name]) / default))}
        for name in names
    }


def bench_techniques(
    presets, precisions, rounds, warmup, corpus, compile: bool, options: dict | None = None
) -> list[dict]:
    """Each model option's training step against the default block's at the same size, precision and batch (RoPE,
    the default encoding): `interleaved_techniques`, a fresh process per size and precision."""
    rows = []
    for preset in presets:
        for precision in precisions:
            result = in_child(interleaved_techniques, preset, precision, rounds, warmup, corpus, compile, options)
            for name, timing in result.items():
                rows.append(
                    {
                        "preset": preset,
                        "precision": precision,
                        "technique": name,
                        "ms_per_step": 1000 * timing["step_s"],
                        "vs_default": timing["vs_default"],
                    }
                )
                print(f"  techniques {preset} {precision} {name}: {1000 * timing['step_s']:.1f} ms", file=sys.stderr)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Generation


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
