"""The benchmark runs end to end with the tiny preset (its numbers are not checked: it is not a timed test), and
nanoGPT's reference loop trains."""

import importlib.util
import json
import subprocess
import sys

from helpers import ROOT, make_corpus_text, run_script

from lm.hardware import cpu_has_bf16_instructions, cpu_supports_bf16


def nanogpt_module():
    """scripts/_nanogpt.py as a module: nanoGPT's reference model and training loop."""
    spec = importlib.util.spec_from_file_location("_nanogpt", ROOT / "scripts" / "_nanogpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    """scripts/benchmark.py with `args`, its output captured."""
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_benchmark_runs_with_the_tiny_preset(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--presets", "tiny", "--steps", "2", "--warmup", "1", "--generate-chars", "20", "--corpus-mb", "1"]
    result = run_benchmark(*tiny, "--skip", "techniques,length", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    # bf16 only where the CPU has it natively (emulated, it is ~100x slower than fp32), also where it does not pay
    native = cpu_has_bf16_instructions()
    assert report["machine"]["native_bf16"] == native and report["machine"]["bf16_pays"] == cpu_supports_bf16()
    assert (report["matmul_peak_flops"]["bf16"] is not None) == native and report["matmul_peak_flops"]["fp32"] > 0
    expected = {"bf16-mixed", "32-true"} if native else {"32-true"}
    assert {row["precision"] for row in report["training"]} == expected
    assert all(row["tokens_per_s"] > 0 and row["plain_ms_per_step"] > 0 for row in report["training"])
    assert not any(row["compiled"] for row in report["training"])  # on a CPU neither project compiles by default
    (reference,) = report["reference"]
    assert reference["compiled"] is False
    assert reference["nanogpt_fp32_ms"] > 0 and reference["speedup_vs_fp32"] > 0
    assert ("nanogpt_bf16_ms" in reference) == native
    if not native:
        assert "No native bf16 here" in result.stdout
    (generation,) = report["generation"]
    assert generation["streams_compiled"] is False  # the eager step is the CPU's faster one
    for key in ("chars_per_s_cache", "chars_per_s_exact", "chars_per_s_compiled", "chars_per_s_8_streams"):
        assert generation[key] > 0, key
    assert generation["chars_per_s_no_cache"] > 0 and generation["weight_pass_one_stream_ms"] > 0
    assert generation["weight_pass_8_rows_ms"] > 0 and generation["weight_pass_8_streams_ms"] > 0
    low, high = generation["streams_speedup_range"]  # the median of the alternated pairs' ratios lies in their range
    assert 0 < low <= generation["streams_speedup"] <= high
    # decoding threads: one against all, quiet and beside a busy process, and the count lm.generate picks
    for setting in ("quiet", "busy"):
        assert (
            generation[f"chars_per_s_one_thread_{setting}"] > 0 and generation[f"chars_per_s_all_threads_{setting}"] > 0
        )
    assert generation["threads_picked"] == 1
    assert "## Decoding threads" in result.stdout
    assert report["corpus"]["prepare_s"] > 0
    assert "| tiny |" in result.stdout


def test_the_techniques_part_times_every_model_option_against_the_default(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--only", "techniques", "--technique-presets", "tiny", "--precisions", "32-true", "--technique-rounds", "3"]
    result = run_benchmark(*args, "--warmup", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["techniques"]
    names = [row["technique"] for row in rows]
    options = ["norm=rmsnorm", "norm_position=post", "mlp=relu", "mlp=relu2", "mlp=swiglu", "qk_norm=true"]
    assert names[0].startswith("default") and set(options + ["tie_embeddings=false", "logit_softcap=30"]) < set(names)
    assert rows[0]["vs_default"] == 1.0 and all(row["ms_per_step"] > 0 for row in rows)
    assert "model option" in result.stdout and "Slowest single option:" in result.stdout


def test_the_length_part_times_each_option_and_generation_past_the_context_with_its_cache(tmp_path):
    out = tmp_path / "bench.json"
    args = ["--only", "length", "--technique-presets", "tiny", "--precisions", "32-true", "--technique-rounds", "2"]
    result = run_benchmark(*args, "--warmup", "1", "--length-decoding-presets", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())["length"]
    options = [row["option"] for row in report["steps"]]
    assert options[0] == "default (rope)" and {"t5", "xpos", "fire", "n_kv_head=1", "attention_window=32"} < set(
        options
    )
    assert report["steps"][0]["vs_default"] == 1.0 and all(row["ms_per_step"] > 0 for row in report["steps"])
    cache = {(row["model"], row["characters"]): row["cache_kib"] for row in report["generation"]}
    assert [c for m, c in cache if m == "full attention"] == ["64 (1x)", "512 (8x)", "2048 (32x)"]
    # GQA's cache holds one key/value head of two; the window's, half the context; both fixed however long the text
    assert cache["n_kv_head=1", "2048 (32x)"] == cache["full attention", "2048 (32x)"] / 2
    assert cache["window T/2", "64 (1x)"] == cache["window T/2", "2048 (32x)"] == cache["full attention", "64 (1x)"] / 2
    assert all(row["chars_per_s"] > 0 for row in report["generation"])
    assert {row["model"] for row in report["decoding"]} == {row["model"] for row in report["generation"]}
    assert "KV cache KiB" in result.stdout and "x full" in result.stdout


def test_nanogpt_reference_recipe_trains(tmp_path):
    train_recipe = nanogpt_module().train_recipe

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(20000))
    result = train_recipe(corpus, n_layer=1, n_head=2, n_embd=32, block_size=32, max_iters=60, lr_decay_iters=60,
                          warmup_iters=5, learning_rate=1e-2, eval_interval=30)  # fmt: skip
    evals = result["evals"]
    assert [e["iter"] for e in evals] == [0, 30, 60]
    assert evals[-1]["val"] < evals[0]["val"] - 0.5  # from ~ln(vocab) towards the corpus's structure
    assert result["val_loss"] == evals[-1]["val"] and result["seconds"] > 0
    assert result["best_val_loss"] == min(e["val"] for e in evals)


def test_nanogpt_gpu_recipe_is_its_shakespeare_config_and_patience_stops_past_the_best(tmp_path):
    nanogpt = nanogpt_module()
    GPU_RECIPE, train_recipe = nanogpt.GPU_RECIPE, nanogpt.train_recipe

    # config/train_shakespeare_char.py, compiled in bf16 as nanoGPT runs it on a GPU
    expected = dict(n_layer=6, n_head=6, n_embd=384, block_size=256, batch_size=64, dropout=0.2, max_iters=5000,
                    learning_rate=1e-3, min_lr=1e-4, beta2=0.99, warmup_iters=100, eval_interval=250, eval_iters=200,
                    log_interval=10, compile=True, dtype="bfloat16")  # fmt: skip
    assert {k: GPU_RECIPE[k] for k in expected} == expected
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(20000))
    # a learning rate this high makes the loss turn up again: the recipe stops one evaluation after its best
    result = train_recipe(corpus, "gpu", patience=1, device="cpu", compile=False, n_layer=1, n_head=2, n_embd=32,
                          block_size=32, batch_size=8, max_iters=400, lr_decay_iters=400, warmup_iters=5, eval_iters=4,
                          eval_interval=10, dropout=0.0, learning_rate=0.3, min_lr=0.3)  # fmt: skip
    vals = [e["val"] for e in result["evals"]]
    best = vals.index(min(vals))
    assert best == len(vals) - 2 and result["best_iter"] == 10 * best  # stopped one evaluation past its best
    assert result["evals"][-1]["iter"] < 400
    times = [e["time"] for e in result["evals"]]
    assert times == sorted(times)


def test_the_run_part_compares_our_default_run_with_nanogpts_recipe_to_their_best(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(20000))
    out = tmp_path / "bench" / "bench.json"
    # nanoGPT at learning rate 0 stays near its initial loss, so ours reaches its best within 40 steps
    nanogpt = "--set n_layer=1 n_head=2 n_embd=32 block_size=32 eval_iters=2 eval_interval=10 warmup_iters=5 " \
              "learning_rate=0 min_lr=0 --max-iters 60"  # fmt: skip
    train = "model=tiny trainer.max_steps=40 trainer.val_check_interval=10 data.seq_length=32 "
    train += "callbacks.throughput.peak_flops=null"
    result = run_benchmark("--only", "run", "--run-corpus", str(corpus), "--train-args", train,
                           f"--nanogpt-args={nanogpt}", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    ours, theirs = json.loads(out.read_text())["run"]["rows"]
    summary = json.loads((tmp_path / "bench" / "run" / "default" / "summary.json").read_text())
    losses = [v["val_loss"] for v in summary["validations"]]
    assert [v["step"] for v in summary["validations"]] == [10, 20, 30, 40]
    assert ours["best_val_loss"] == min(losses) and ours["last_val_loss"] == losses[-1]
    assert 0 < ours["time_to_best_s"] <= ours["wall_s"] and ours["steps"] == 40
    assert 0 < ours["after_validation_share"] < ours["validation_share"] < 1
    assert 0 < theirs["time_to_best_s"] <= theirs["wall_s"] and theirs["best_step"] % 10 == 0
    assert theirs["best_val_loss"] <= theirs["last_val_loss"] and theirs["steps"] - theirs["best_step"] <= 20
    # when ours first reached nanoGPT's best loss: at its first validation at or below it
    reached = [v for v in summary["validations"] if v["val_loss"] <= theirs["best_val_loss"]]
    assert reached and ours["step_to_nanogpt_best"] == reached[0]["step"]
    assert 0 < ours["time_to_nanogpt_best_s"] <= ours["time_to_best_s"]
    assert (
        f"Ours reached nanoGPT's best loss ({theirs['best_val_loss']:.4f}) by step {reached[0]['step']}"
        in result.stdout
    )
    assert "| ours: python scripts/train.py |" in result.stdout and "From launch to its best" in result.stdout


def test_an_unknown_part_is_one_line_naming_the_parts(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # where `python scripts/benchmark.py` finds its helpers
    result = run_script("benchmark.py", "--only", "trian", in_process=True, check=False)
    assert result.returncode == 2 and "unknown part 'trian' in --only; choose from peak, train" in result.stderr
