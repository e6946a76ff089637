"""The benchmark runs end to end with the tiny preset (its numbers are not checked: it is not a timed test)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
    assert report["matmul_peak_flops"]["bf16"] > 0 and report["matmul_peak_flops"]["fp32"] > 0
    assert {row["precision"] for row in report["training"]} == {"bf16-mixed", "32-true"}
    assert all(row["tokens_per_s"] > 0 and row["plain_ms_per_step"] > 0 for row in report["training"])
    (reference,) = report["reference"]
    assert reference["nanogpt_fp32_ms"] > 0 and reference["nanogpt_bf16_ms"] > 0 and reference["speedup_vs_fp32"] > 0
    assert report["generation"][0]["chars_per_s_cache"] > 0
    assert report["corpus"]["prepare_s"] > 0
    assert "| tiny |" in result.stdout
