"""Whole runs, each a fresh process, start-up included: `scripts/benchmark.py`'s comparisons of our default run
(`python scripts/train.py`) with nanoGPT's recipe (`scripts/_nanogpt.py`) on Tiny Shakespeare.

- `run`: both as they are on this machine (on a GPU, our GPU recipe against nanoGPT's config/train_shakespeare_char.py;
  on a CPU, our CPU recipe against nanoGPT's CPU command): the best validation loss, how long from launch each took
  to reach it, and what our validations cost (summary.json's `validations`).
- `quality`: validation loss at equal wall time against nanoGPT's CPU recipe, ours given its time and it given ours.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lm.config import PROJECT_ROOT as ROOT
from lm.data import CharDataModule


def tiny_shakespeare() -> Path:
    """The corpus both runs read: downloaded once, or the copy in data/."""
    datamodule = CharDataModule(data_dir=str(ROOT / "data"))
    datamodule.prepare_data()
    return Path(datamodule.corpus_path)


def timed_command(cmd: list[str]) -> tuple[float, str, str]:
    """Runs `cmd` to the end; its wall time (start-up included), stdout and stderr. A failure stops the benchmark."""
    start = time.perf_counter()
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return seconds, result.stdout, result.stderr


def nanogpt_run(corpus: Path, max_iters: int) -> dict:
    script = str(ROOT / "scripts" / "_nanogpt.py")
    seconds, stdout, _ = timed_command(
        [sys.executable, script, str(corpus), "--recipe", "cpu", "--max-iters", str(max_iters)]
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"wall_s": seconds, "val_loss": result["val_loss"], "iters": max_iters}


def our_run(out_dir: Path, name: str, max_time_s: float | None) -> dict:
    """`python scripts/train.py` with the defaults, or with its time budget set to `max_time_s`."""
    shutil.rmtree(out_dir / name, ignore_errors=True)  # a fresh run dir: TensorBoard shows this run alone
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={out_dir / name}"]
    if max_time_s is not None:
        minutes, seconds = divmod(int(max_time_s), 60)
        cmd.append(f"trainer.max_time=00:00:{minutes:02d}:{seconds:02d}")
    seconds, _, stderr = timed_command(cmd)
    final = re.search(r"final .*val/loss=([0-9.]+)", stderr)
    budget = re.search(r"a time budget of (\S+) ", stderr)
    if final is None or budget is None:
        sys.exit(f"error: no final val/loss or time budget in the output of {' '.join(cmd)}:\n{stderr[-3000:]}")
    hms = [int(x) for x in budget.group(1).split(":")]
    return {
        "wall_s": seconds,
        "val_loss": float(final.group(1)),
        "budget_s": sum(x * 60**i for i, x in enumerate(reversed(hms))),
    }


def bench_quality(out_dir: Path) -> dict:
    """Validation loss at equal wall time, start-up included: nanoGPT's CPU recipe as documented, our default run
    given nanoGPT's wall time, our default five-minute run, and nanoGPT's recipe stretched to that time."""
    corpus = tiny_shakespeare()
    print("  quality: nanoGPT's CPU recipe (2000 iterations)", file=sys.stderr, flush=True)
    nanogpt = nanogpt_run(corpus, 2000)
    print(f"    {nanogpt['wall_s']:.0f} s, val {nanogpt['val_loss']:.4f}", file=sys.stderr, flush=True)
    print("  quality: ours, default five-minute run", file=sys.stderr, flush=True)
    ours_default = our_run(out_dir, "default", None)
    # what a run costs besides its training budget: start-up, the last validation, the sample
    overhead = ours_default["wall_s"] - ours_default["budget_s"]
    print(f"    {ours_default['wall_s']:.0f} s, val {ours_default['val_loss']:.4f}", file=sys.stderr, flush=True)
    print("  quality: ours, given nanoGPT's wall time", file=sys.stderr, flush=True)
    ours_short = our_run(out_dir, "nanogpt_time", nanogpt["wall_s"] - overhead)
    print(f"    {ours_short['wall_s']:.0f} s, val {ours_short['val_loss']:.4f}", file=sys.stderr, flush=True)
    iters = round(2000 * ours_default["wall_s"] / nanogpt["wall_s"])
    print(f"  quality: nanoGPT's recipe stretched to {iters} iterations", file=sys.stderr, flush=True)
    nanogpt_long = nanogpt_run(corpus, iters)
    print(f"    {nanogpt_long['wall_s']:.0f} s, val {nanogpt_long['val_loss']:.4f}", file=sys.stderr, flush=True)
    return {
        "rows": [
            {"run": "nanoGPT CPU recipe (2000 iterations)", "budget": "short", **nanogpt},
            {"run": "ours, default run with nanoGPT's wall time", "budget": "short", **ours_short},
            {"run": f"nanoGPT CPU recipe stretched ({iters} iterations)", "budget": "long", **nanogpt_long},
            {"run": "ours, default run (python scripts/train.py)", "budget": "long", **ours_default},
        ],
        "gain_at_nanogpt_time": nanogpt["val_loss"] - ours_short["val_loss"],
        "gain_at_default_time": nanogpt_long["val_loss"] - ours_default["val_loss"],
    }


def bench_run(
    out_dir: Path, corpus: Path | None, train_args: list[str], nanogpt_args: list[str], patience: int
) -> dict:
    """Our default run and nanoGPT's recipe, as each runs here: the best validation loss, the time from launch to
    the evaluation that found it, and what our validations (with their text samples and checkpoints) cost.

    `corpus` (default Tiny Shakespeare), `train_args` (train.py overrides) and `nanogpt_args` (scripts/_nanogpt.py
    options) make it small enough to test. nanoGPT stops `patience` evaluations after its best (it would run on to
    its 5,000 iterations, overfitting: the losses up to there are the same).
    """
    run_dir = out_dir / "default"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run dir: its summary.json is this run's
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), f"hydra.run.dir={run_dir}"]
    cmd += [f"data.path={corpus}"] if corpus else []
    ours_launched = time.time()
    wall, _, stderr = timed_command([*cmd, *train_args])
    summary = json.loads((run_dir / "summary.json").read_text())
    validations = [v for v in summary.get("validations", []) if v.get("val_loss") is not None]
    if not validations:
        sys.exit(f"error: {run_dir / 'summary.json'} records no validation; keep callbacks.validation_cost.")
    best = min(validations, key=lambda v: v["val_loss"])
    compiled = re.search(r"compiled the model: the first step took ([0-9.]+) s", stderr)
    ours = {
        "run": "ours: python scripts/train.py",
        "best_val_loss": best["val_loss"],
        "best_step": best["step"],
        "time_to_best_s": best["time"] - ours_launched,
        "last_val_loss": validations[-1]["val_loss"],
        "steps": summary["global_step"],
        "wall_s": wall,
        "compile_s": float(compiled.group(1)) if compiled else None,
        "validations": len(validations),
        "validation_s": summary["validation_seconds"],
        "validation_share": summary["validation_seconds"] / wall,
        "after_validation_share": sum(v.get("after_s", 0.0) for v in validations) / wall,
    }
    print(f"    ours: {wall:.0f} s, best val {ours['best_val_loss']:.4f}", file=sys.stderr, flush=True)

    corpus = corpus or tiny_shakespeare()
    cmd = [sys.executable, str(ROOT / "scripts" / "_nanogpt.py"), str(corpus), "--patience", str(patience)]
    launched = time.time()
    wall, stdout, _ = timed_command([*cmd, *nanogpt_args])
    result = json.loads(stdout.strip().splitlines()[-1])
    best = min(result["evals"], key=lambda e: e["val"])
    recipe = result["recipe"]
    nanogpt = {
        "run": f"nanoGPT: its {'GPU' if recipe['device'] == 'cuda' else 'CPU'} recipe, to {patience} evaluations "
        "past its best",
        "best_val_loss": best["val"],
        "best_step": best["iter"],
        "time_to_best_s": best["time"] - launched,
        "last_val_loss": result["evals"][-1]["val"],
        "steps": result["evals"][-1]["iter"],
        "wall_s": wall,
    }
    print(f"    nanoGPT: {wall:.0f} s, best val {nanogpt['best_val_loss']:.4f}", file=sys.stderr, flush=True)
    # when ours first reached nanoGPT's best loss: at the first validation at or below it (an upper bound: validations
    # are some steps apart)
    reached = next((v for v in validations if v["val_loss"] <= nanogpt["best_val_loss"]), None)
    ours["time_to_nanogpt_best_s"] = reached["time"] - ours_launched if reached else None
    ours["step_to_nanogpt_best"] = reached["step"] if reached else None
    return {"rows": [ours, nanogpt]}


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
