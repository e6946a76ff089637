"""Measure this machine: matmul peak, training throughput (Lightning vs a plain loop, ours vs nanoGPT's), whole runs
against nanoGPT's recipe, generation speed, corpus preparation.

    python scripts/benchmark.py                                  # on 2 CPU cores 10-17 minutes; on a GPU, its
                                                                 # own set (base, compiled, whole runs), for 5 min
    python scripts/benchmark.py --presets tiny,small --steps 3 --skip corpus   # about a minute
    python scripts/benchmark.py --only generate --presets mini,small,base
    python scripts/benchmark.py --only run     # our default run vs nanoGPT's recipe, to the best (~6 min on a CPU)
    python scripts/benchmark.py --only quality                   # our default vs nanoGPT's CPU recipe, ~15 minutes
    python scripts/benchmark.py --only techniques     # each model option's step against the default's, ~1 min
    python scripts/benchmark.py --only length   # reading past the training length: steps, generation, cache

Prints Markdown tables and writes them as JSON (--out). Numbers are comparable within one run on one machine only.
"""

import argparse
import json
import platform
import shlex
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from _benchmark_generation import bench_generation
from _benchmark_length import bench_decoding_steps, bench_length_generation, bench_length_steps
from _benchmark_runs import bench_quality, bench_run, reached_nanogpt
from _benchmark_tables import (
    CORPUS_COLUMNS,
    GENERATION_COLUMNS,
    REFERENCE_COLUMNS,
    RUN_COLUMNS,
    THREAD_COLUMNS,
    TRAINING_COLUMNS,
    print_table,
)
from _benchmark_training import (
    SHAPES,
    bench_corpus,
    bench_reference,
    bench_techniques,
    bench_training,
    synthetic_corpus,
)

from lm.config import PROJECT_ROOT
from lm.hardware import bf16_supported, cpu_has_bf16_instructions, measure_matmul_peak

# ours on CUDA only (model.compile=auto), nanoGPT on a GPU (its compile=True; its CPU recipe turns it off).
DEFAULTS = {
    "cpu": dict(
        presets="tiny,mini,small,base",
        only="peak,train,plain,reference,techniques,length,generate,corpus",
        steps=5,
        warmup=2,
    ),
    "cuda": dict(presets="base", only="peak,train,reference,techniques,length,run,generate", steps=50, warmup=10),
}
PARTS = ("peak", "train", "plain", "reference", "techniques", "length", "run", "generate", "corpus", "quality")


def parse_args(device: str) -> argparse.Namespace:
    """The command line; a part or preset that does not exist is refused."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = DEFAULTS[device]
    parser.add_argument("--presets", default=defaults["presets"], help="comma-separated: tiny, mini, small, base")
    parser.add_argument(
        "--precisions",
        default="auto",
        help="Lightning precisions to train in; auto: on a GPU bf16-mixed (what runs use there); on a CPU bf16-mixed "
        "and 32-true where it has native bf16 instructions, else 32-true only (emulated bf16 is far slower than fp32)",
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
    parser.add_argument(
        "--technique-presets",
        default="base" if device == "cuda" else "mini",
        help="techniques and length: the sizes to time each model option at (default: the default run's size here)",
    )
    parser.add_argument(
        "--technique-rounds", type=int, default=60, help="techniques: timed rounds (one step of every option each)"
    )
    parser.add_argument(
        "--length-decoding-presets",
        default="mini,base",
        help="length: the sizes to time a cached decoding step at, with and without GQA and a window",
    )
    parser.add_argument("--run-corpus", type=Path, help="run: the corpus of both runs (default Tiny Shakespeare)")
    parser.add_argument("--train-args", default="", help='run: overrides for our run, e.g. "trainer.max_steps=1000"')
    parser.add_argument(
        "--nanogpt-args",
        default="",
        help='run: options for scripts/_nanogpt.py, given with "=": --nanogpt-args="--set eval_iters=50"',
    )
    parser.add_argument("--patience", type=int, default=2, help="run: stop nanoGPT this many evaluations past its best")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "outputs" / "benchmark.json"))
    args = parser.parse_args()
    args.parts = [p for p in args.only.split(",") if p and p not in args.skip.split(",")]
    for part in args.parts:
        if part not in PARTS:
            parser.error(f"unknown part {part!r} in --only; choose from {', '.join(PARTS)}")
    args.preset_list = [p for p in args.presets.split(",") if p]
    for p in args.preset_list:
        if p not in SHAPES:
            parser.error(f"unknown preset {p!r}; choose from {', '.join(SHAPES)}")
    return args


def machine(device: str) -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "native_bf16": bf16_supported(device) if device == "cuda" else cpu_has_bf16_instructions(),
        "bf16_pays": bf16_supported(device),  # what trainer.precision=auto picks bf16 on
    }


def training_precisions(setting: str, device: str) -> list[str]:
    """--precisions, with auto worked out for this machine (and a line when bf16 is left out)."""
    precisions = [p for p in setting.split(",") if p]
    if precisions != ["auto"]:
        return precisions
    if device == "cuda":
        return ["bf16-mixed"] if bf16_supported(device) else ["32-true"]
    if cpu_has_bf16_instructions():  # both, also where bf16 measured slower: that is worth seeing
        return ["bf16-mixed", "32-true"]
    print("No native bf16 here: bf16 is left out (--precisions bf16-mixed,32-true to measure it anyway).\n")
    return ["32-true"]


def training_parts(args, precisions: list[str], compile: bool, device: str, report: dict) -> None:
    """peak, train, plain and reference: the matmul peak, then our step against a plain loop and nanoGPT's."""
    peaks = {
        "bf16": measure_matmul_peak(torch.bfloat16, device) if "bf16-mixed" in precisions else None,
        "fp32": measure_matmul_peak(torch.float32, device),
    }
    report["matmul_peak_flops"] = peaks
    bf16 = f"bf16 {peaks['bf16'] / 1e12:.2f} TFLOP/s, " if peaks["bf16"] else ""
    print(f"Matrix-multiply peak (2048x2048): {bf16}fp32 {peaks['fp32'] / 1e12:.2f} TFLOP/s\n")
    if "train" not in args.parts:
        return
    presets, steps, warmup = args.preset_list, args.steps, args.warmup
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        synthetic_corpus(corpus, 2 * 2**20)
        plain = "plain" in args.parts
        rows = bench_training(presets, precisions, steps, warmup, corpus, peaks, compile, plain)
        report["training"] = rows
        title = "Training step (Lightning, as scripts/train.py runs it)" + (" vs a plain PyTorch loop" * plain)
        print_table(title, rows, TRAINING_COLUMNS)
        if "reference" in args.parts:
            rows = bench_reference(presets, precisions, steps, warmup, corpus, rows, compile)
            report["reference"] = rows
            title = "Against nanoGPT's model and training loop (plain PyTorch), same sizes and batches"
            print_table(title, rows, REFERENCE_COLUMNS)


def techniques_part(args, precisions: list[str], compile: bool, report: dict) -> None:
    """techniques: each model option's training step against the default block's, same size and batch."""
    presets = [p for p in args.technique_presets.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        synthetic_corpus(corpus, 2 * 2**20)
        rows = bench_techniques(presets, precisions, args.technique_rounds, args.warmup, corpus, compile)
    report["techniques"] = rows
    info = report["machine"]
    title = f"Each model option's training step against the default block's ({info['cpu']}, {info['device']})"
    columns = {"preset": "size", "precision": "precision", "technique": "model option", "ms_per_step": "ms/step"}
    print_table(title, rows, {**columns, "vs_default": "x default"})
    single = [r for r in rows if not r["technique"].startswith(("default", "all"))]  # one option each
    worst = max(single, key=lambda r: r["vs_default"])
    where = f"{worst['preset']}, {worst['precision']}"
    print(f"Slowest single option: {worst['technique']} ({where}), {worst['vs_default']:.2f}x the default.\n")


def length_part(args, precisions: list[str], compile: bool, report: dict) -> None:
    """length: each option for reading past the training length, its training step against the default's; and
    cached generation's speed and KV-cache memory at 1x, 8x and 32x the training length."""
    presets = [p for p in args.technique_presets.split(",") if p]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        synthetic_corpus(corpus, 2 * 2**20)
        rows = bench_length_steps(presets, precisions, args.technique_rounds, args.warmup, corpus, compile)
    info = report["machine"]
    title = f"Each length option's training step against the default's ({info['cpu']}, {info['device']})"
    columns = {"preset": "size", "precision": "precision", "option": "option", "ms_per_step": "ms/step"}
    print_table(title, rows, {**columns, "vs_default": "x default"})
    generation = [row for preset in presets for row in bench_length_generation(preset)]
    title = "Cached generation past the training length (one stream, fp32, exact), and the KV cache it keeps"
    columns = {"preset": "size", "model": "model", "characters": "characters", "chars_per_s": "chars/s"}
    print_table(title, generation, {**columns, "cache_kib": "KV cache KiB"})
    decoding = bench_decoding_steps([p for p in args.length_decoding_presets.split(",") if p])
    title = "A cached decoding step (one stream, fp32, exact), against full attention's"
    columns = {"preset": "size", "model": "model", "us_per_step": "us/step", "vs_full": "x full"}
    print_table(title, decoding, columns)
    report["length"] = {"steps": rows, "generation": generation, "decoding": decoding}


def run_part(args, report: dict) -> None:
    """run: our default run against nanoGPT's recipe, each a fresh process, to its best validation loss."""
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


def quality_part(args, report: dict) -> None:
    """quality: validation loss at equal wall time against nanoGPT's CPU recipe."""
    quality = bench_quality(Path(args.out).parent / "quality")
    report["quality"] = quality
    title = "Validation loss at equal wall time (Tiny Shakespeare, start-up included)"
    print_table(title, quality["rows"], {"run": "run", "wall_s": "wall s", "val_loss": "val loss"})
    print(
        "Ours: over the whole validation split. nanoGPT: its own estimate (mean of 20 random batches of 12 x 64).\n"
        f"Ours lower by {quality['gain_at_nanogpt_time']:.3f} nats at nanoGPT's wall time and "
        f"{quality['gain_at_default_time']:.3f} at the default run's.\n"
    )


def main() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = parse_args(device)
    warnings.filterwarnings("ignore")
    compile = device == "cuda" if args.compile == "auto" else args.compile == "true"
    if device == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32, as training sets it on a GPU
    report = {"machine": machine(device)}
    info = report["machine"]
    print(f"# Benchmark on {info['device']} ({info['cpu']}, {info['threads']} threads, torch {torch.__version__})\n")
    precisions = training_precisions(args.precisions, device)
    if "peak" in args.parts or "train" in args.parts:
        training_parts(args, precisions, compile, device, report)
    if "techniques" in args.parts:
        techniques_part(args, precisions, compile, report)
    if "length" in args.parts:
        length_part(args, precisions, compile, report)
    if "run" in args.parts:
        run_part(args, report)
    if "generate" in args.parts:
        rows = bench_generation(args.preset_list, args.generate_chars, "fp32")
        report["generation"] = rows
        streams = "compiled step" if device == "cuda" else "KV cache"
        columns = {**GENERATION_COLUMNS, "chars_per_s_8_streams": f"chars/s, 8 streams (total, {streams})"}
        print_table(f"Generation of {args.generate_chars} characters (fp32, sampling at temperature 1)", rows, columns)
        if device == "cpu":
            threads = torch.get_num_threads()
            title = f"Decoding threads: one stream, 1 against all {threads}, quiet and beside a busy process"
            print_table(title, rows, THREAD_COLUMNS)
    if "quality" in args.parts:
        quality_part(args, report)
    if "corpus" in args.parts:
        row = bench_corpus(args.corpus_mb, args.steps)
        report["corpus"] = row
        print_table(f"A {args.corpus_mb} MB corpus", [row], CORPUS_COLUMNS)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
