"""The benchmark runs end to end with the tiny preset (its numbers are not checked: it is not a timed test), and
nanoGPT's reference loop trains."""

import json
import subprocess
import sys
from pathlib import Path

from conftest import make_corpus_text

from lm.hardware import cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))


def test_benchmark_runs_with_the_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmark.py"),
            "--presets",
            "tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--generate-chars",
            "20",
            "--corpus-mb",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # bf16 only where the CPU has it natively (emulated, it is ~100x slower than fp32)
    native = cpu_supports_bf16()
    assert report["machine"]["native_bf16"] == native
    assert (report["matmul_peak_flops"]["bf16"] is not None) == native and report["matmul_peak_flops"]["fp32"] > 0
    expected = {"bf16-mixed", "32-true"} if native else {"32-true"}
    assert {row["precision"] for row in report["training"]} == expected
    assert all(row["tokens_per_s"] > 0 and row["plain_ms_per_step"] > 0 for row in report["training"])
    (reference,) = report["reference"]
    assert reference["nanogpt_fp32_ms"] > 0 and reference["speedup_vs_fp32"] > 0
    assert ("nanogpt_bf16_ms" in reference) == native
    if not native:
        assert "No native bf16 here" in result.stdout
    (generation,) = report["generation"]
    for key in ("chars_per_s_cache", "chars_per_s_exact", "chars_per_s_compiled", "chars_per_s_8_streams"):
        assert generation[key] > 0, key
    assert generation["chars_per_s_no_cache"] > 0 and generation["weight_pass_one_stream_ms"] > 0
    assert generation["weight_pass_8_rows_ms"] > 0 and generation["weight_pass_8_streams_ms"] > 0
    low, high = generation["streams_speedup_range"]  # the median of the alternated pairs' ratios lies in their range
    assert 0 < low <= generation["streams_speedup"] <= high
    assert report["corpus"]["prepare_s"] > 0
    assert "| tiny |" in result.stdout


def test_nanogpt_reference_recipe_trains(tmp_path):
    from _nanogpt import train_recipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(20000))
    result = train_recipe(corpus, n_layer=1, n_head=2, n_embd=32, block_size=32, max_iters=60, lr_decay_iters=60,
                          warmup_iters=5, learning_rate=1e-2, eval_interval=30)  # fmt: skip
    evals = result["evals"]
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val"] < evals[0]["val"] - 0.5  # from ~ln(vocab) towards the corpus's structure
    assert result["val_loss"] == evals[-1]["val"] and result["seconds"] > 0
