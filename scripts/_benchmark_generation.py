"""The benchmark's generation part: characters per second with and without the KV cache, float16 weights, several
streams, and (on a CPU) what a decoding step spends its time on and what threads do for it, on a quiet machine and
beside a busy process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import numpy as np
import torch
from _benchmark_training import SHAKESPEARE_ALPHABET, median_step_time, preset_config

from lm.decoding import decode_linear, decoding_matrices
from lm.generate import decoding_threads, generate
from lm.model import Transformer
from lm.tokenizer import CharTokenizer


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
        model = Transformer(preset_config(preset, tokenizer.vocab_size)).to("cuda" if cuda else "cpu").eval()
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
            row.update(thread_study(model, tokenizer, n_chars, pairs))
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


# another process keeping one core busy with matrix products: what a second run beside this one does
NEIGHBOUR = "import torch\ntorch.set_num_threads(1)\na = torch.randn(512, 512)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def busy_neighbour():
    """Runs `NEIGHBOUR` in a process of its own for the duration of the block."""
    process = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        time.sleep(1.0)  # past its start-up, to its busy loop
        yield
    finally:
        process.kill()
        process.wait()


def thread_study(model: Transformer, tokenizer: CharTokenizer, n_chars: int, pairs: int) -> dict:
    """One stream's chars/s on one thread against all the process's threads (torch's default), alternated, on a
    quiet machine and beside `busy_neighbour`; and the count `lm.generate` picks by the model's size."""
    threads = torch.get_num_threads()
    row = {"threads": threads, "threads_picked": decoding_threads(model)}
    variants = {"one": {"threads": 1}, "all": {"threads": threads}}
    for setting, beside in (("quiet", contextlib.nullcontext), ("busy", busy_neighbour)):
        with beside():
            rates = alternated_chars_per_second(model, tokenizer, n_chars, pairs, variants)
        row[f"chars_per_s_one_thread_{setting}"] = float(np.median(rates["one"]))
        row[f"chars_per_s_all_threads_{setting}"] = float(np.median(rates["all"]))
    print(
        f"  generate (threads): one thread {row['chars_per_s_one_thread_quiet']:.0f} chars/s quiet, "
        f"{row['chars_per_s_one_thread_busy']:.0f} beside a busy process; {threads} threads "
        f"{row['chars_per_s_all_threads_quiet']:.0f} and {row['chars_per_s_all_threads_busy']:.0f}; "
        f"lm.generate picks {row['threads_picked']}",
        file=sys.stderr,
        flush=True,
    )
    return row
