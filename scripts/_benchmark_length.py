"""The benchmark's length part: what each option for reading past the training length costs. A training step of
each (RoPE's settings, the other encodings, grouped-query attention, a sliding window) against the default's, timed
as the techniques part times its options; and generation's characters per second and KV-cache memory at 1x, 8x and
32x the training length, with and without GQA and a window."""

from __future__ import annotations

import time

import numpy as np
import torch
from _benchmark_training import SHAKESPEARE_ALPHABET, SHAPES, bench_techniques, preset_config

from lm.decoding import cache_length, decode_step, rewind_cache
from lm.generate import generate
from lm.model import KVCache, PositionalEncodingConfig, Transformer
from lm.tokenizer import CharTokenizer

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # generation and decoding steps run where training does


def length_options(seq_length: int) -> dict[str, dict]:
    """The options for reading past the training length, as TransformerConfig changes; the first is the baseline
    (the default model: RoPE, full attention)."""

    def encoding(name: str, **settings) -> dict:
        return {"pos_encoding": PositionalEncodingConfig(name=name, **settings)}

    return {
        "default (rope)": {},
        "rope rotary_fraction=0.25": encoding("rope", rotary_fraction=0.25),
        "rope scaling=yarn x4": encoding("rope", scaling="yarn", scaling_factor=4.0),
        "rope scaling=dynamic x4": encoding("rope", scaling="dynamic", scaling_factor=4.0),
        "alibi": encoding("alibi"),
        "t5": encoding("t5"),
        "xpos": encoding("xpos"),
        "fire": encoding("fire"),
        "n_kv_head=1": {"n_kv_head": 1},
        "n_kv_head=2": {"n_kv_head": 2},
        f"attention_window={seq_length // 2}": {"attention_window": seq_length // 2},
        f"attention_window={seq_length // 2}, sinks=4": {"attention_window": seq_length // 2, "attention_sinks": 4},
    }


def bench_length_steps(presets, precisions, rounds: int, warmup: int, corpus, compile: bool) -> list[dict]:
    """Each option's training step against the default's (`interleaved_techniques`, a process per size and
    precision)."""
    rows = []
    for preset in presets:
        options = length_options(SHAPES[preset][0])
        rows += bench_techniques([preset], precisions, rounds, warmup, corpus, compile, options)
    for row in rows:
        row["option"] = row.pop("technique")
    return rows


GENERATION_MODELS = {
    "full attention": {},
    "n_kv_head=1": {"n_kv_head": 1},
    "window T/2": {"window": True},
    "window T/2, 4 sinks, n_kv_head=1": {"window": True, "attention_sinks": 4, "n_kv_head": 1},
}


def bench_length_generation(preset: str, multiples=(1, 8, 32), repeats: int = 3) -> list[dict]:
    """Characters per second of cached generation (one stream, float32 weights, `exact`) for as many characters
    as each multiple of the training length, and the KV cache's bytes, for the full model and with GQA and a
    window (random weights: the speed does not depend on them). The models take turns in every round, so that a
    shared machine's slow and fast seconds fall on all of them."""
    base = preset_config(preset)
    tokenizer = CharTokenizer(SHAKESPEARE_ALPHABET)
    models, cache_bytes = {}, {}
    for name, settings in GENERATION_MODELS.items():
        settings = dict(settings)
        if settings.pop("window", False):
            settings["attention_window"] = base.seq_length // 2
        torch.manual_seed(0)
        config = type(base)(**{**base.to_dict(), **settings})
        models[name] = Transformer(config).to(DEVICE).eval()
        cache_bytes[name] = KVCache(config, 1, cache_length(models[name]), DEVICE, torch.float32).memory_bytes()
        generate(models[name], tokenizer, "\n", 50, seed=0, exact=True)  # warm-up
    rows = []
    for multiple in multiples:
        n = multiple * base.seq_length
        rates = {name: [] for name in models}
        for repeat in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                generate(model, tokenizer, "\n", n, temperature=1.0, seed=repeat, exact=True)
                rates[name].append(n / (time.perf_counter() - start))
        for name in models:
            rows.append(
                {
                    "preset": preset,
                    "model": name,
                    "characters": f"{n} ({multiple}x)",
                    "chars_per_s": float(np.median(rates[name])),
                    "cache_kib": cache_bytes[name] / 1024,
                }
            )
    return rows


def bench_decoding_steps(presets, steps: int = 100, rounds: int = 9) -> list[dict]:
    """Microseconds per cached decoding step (one stream, fp32, exact weights) of each GENERATION_MODELS model at
    each size: the models take turns in every round, the median round counts."""
    rows = []
    for preset in presets:
        base = preset_config(preset)
        models = {}
        for name, settings in GENERATION_MODELS.items():
            settings = dict(settings)
            if settings.pop("window", False):
                settings["attention_window"] = base.seq_length // 2
            torch.manual_seed(0)
            models[name] = Transformer(type(base)(**{**base.to_dict(), **settings})).to(DEVICE).eval()
        times = {name: [] for name in models}
        with torch.inference_mode():
            for _ in range(rounds):
                for name, model in models.items():
                    cache = KVCache(model.config, 1, cache_length(model), DEVICE, torch.float32)
                    model(torch.zeros(1, 1, dtype=torch.long, device=DEVICE), cache)
                    ids = torch.zeros(1, dtype=torch.long, device=DEVICE)
                    start = time.perf_counter()
                    for _ in range(steps):
                        decode_step(model, ids, cache.positions[cache.length], cache)
                        cache.length += 1
                        if cache.length == 2 * cache.max_length:
                            rewind_cache(model, cache)
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) / steps * 1e6)
        full = float(np.median(times["full attention"]))
        for name in models:
            us = float(np.median(times[name]))
            rows.append({"preset": preset, "model": name, "us_per_step": us, "vs_full": us / full})
    return rows
