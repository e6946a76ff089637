"""The benchmark's tables: their columns, and how they print as Markdown."""

from __future__ import annotations

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
THREAD_COLUMNS = {
    "preset": "preset",
    "threads_picked": "threads lm.generate picks",
    "chars_per_s_one_thread_quiet": "chars/s, 1 thread, quiet",
    "chars_per_s_all_threads_quiet": "chars/s, all threads, quiet",
    "chars_per_s_one_thread_busy": "chars/s, 1 thread, busy neighbour",
    "chars_per_s_all_threads_busy": "chars/s, all threads, busy neighbour",
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
