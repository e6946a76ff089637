"""Turns a sweep directory (one Hydra multirun) into a results table and plots.

    from lm.report import sweep_table
    rows = sweep_table("outputs/multirun/pe_study/2026-11-26_01-00-00")   # one dict per configuration

Each job directory of the sweep holds `.hydra/overrides.yaml` (what the job changed), TensorBoard event files
(read in full, not TensorBoard's default sample) and, once it has finished, failed or been interrupted,
`summary.json` (final metrics, wall time, parameters and the evaluations at several context lengths). Jobs that
are given the same overrides except `seed` form one configuration; numbers are mean and standard deviation over its
finished seeds. Failed, interrupted and unstarted jobs are listed with their state (`lm.sweep.job_state`), never
fatal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.naming import readable_numbers
from lm.sweep import job_state

# tensorboard's reader logs every file it finishes at INFO, which Hydra's logging would print
logging.getLogger("tensorboard").setLevel(logging.WARNING)

# overrides that never tell configurations apart
IGNORED_OVERRIDES = ("seed", "experiment", "hparams_search", "resume")


@dataclass
class Curve:
    """One logged series of a run: its steps, seconds, and values. `seconds` are since the run's first event, except
    val/loss's, which are on the run's training clock where its summary.json records its validations (`on_clock`)."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)


@dataclass
class JobRecord:
    """One job of a sweep: where it is, what it changed, how it ended, and what it logged."""

    path: Path
    overrides: list[str]
    status: str  # finished | interrupted | failed | not started (lm.sweep.job_state)
    summary: dict
    curves: dict[str, Curve]
    label: str = ""
    state: str = ""  # the state in words: "interrupted at step 340", "failed: <its error line>"

    @property
    def seed(self) -> str | None:
        return next((o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0] == "seed"), None)


CURVES = ("val/loss", "train/loss", "speed/tokens_per_sec")


def read_curves(run_dir: Path, tags: tuple[str, ...] = CURVES) -> dict[str, Curve]:
    """All logged values of `tags` from the run's event files (every point: size_guidance 0 lifts the sampling)."""
    if not any(run_dir.glob("events.out.tfevents.*")):
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    try:
        start = events.FirstEventTimestamp()
    except ValueError:
        return {}
    available = set(events.Tags().get("scalars", []))
    curves = {}
    for tag in tags:
        if tag in available:
            points = events.Scalars(tag)
            curves[tag] = Curve(
                [p.step for p in points], [p.wall_time - start for p in points], [p.value for p in points]
            )
    return curves


def on_clock(curves: dict[str, Curve], validations: list[dict] | None) -> dict[str, Curve]:
    """`curves` with val/loss against training time: each validation's `fit_seconds` from summary.json, which counts
    every session of a resumed run and no pause between them (event times would count the pause). Left on event
    times when the summary does not have every step the curve has (a run from before the clock was recorded)."""
    curve = curves.get("val/loss")
    if curve is None or not validations:
        return curves
    clock = {r["step"]: r["fit_seconds"] for r in validations if r.get("fit_seconds") is not None}
    if all(step in clock for step in curve.steps):
        curves["val/loss"] = Curve(curve.steps, [clock[step] for step in curve.steps], curve.values)
    return curves


def load_sweep(sweep_dir: Path | str) -> list[JobRecord]:
    """Every job of the sweep, labelled by the overrides that differ between configurations."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory; pass a sweep dir such as outputs/multirun/<date>.")
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=_job_order):
        job_dir = overrides_file.parent.parent
        overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        state = job_state(job_dir)  # (it reads summary.json)
        curves = on_clock(read_curves(job_dir), (state.summary or {}).get("validations"))
        jobs.append(JobRecord(job_dir, overrides, state.state, state.summary or {}, curves, state=state.describe()))
    _label(jobs)
    return jobs


def _job_order(path: Path) -> tuple[int, str]:
    name = path.parent.parent.name
    number = name.split("_", 1)[0]
    return (int(number) if number.isdigit() else math.inf, name)


def _label(jobs: list[JobRecord]) -> None:
    """A job's configuration is its overrides less the seed and those every job shares."""
    relevant = [[o for o in job.overrides if o.split("=", 1)[0].lstrip("+~") not in IGNORED_OVERRIDES] for job in jobs]
    shared = set.intersection(*(set(r) for r in relevant)) if relevant else set()
    for job, items in zip(jobs, relevant, strict=True):
        job.label = " ".join(o for o in items if o not in shared) or "all runs"


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation of the finite values; the deviation is None with fewer than two."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else None


def _evaluation(job: JobRecord, multiple: int) -> float | None:
    seq_length = job.summary.get("eval_base_length") or job.summary.get("seq_length")
    for result in job.summary.get("evaluations", []):
        if seq_length and result["context_length"] == multiple * seq_length:
            return result["loss"]
    return None


def train_loss(job: JobRecord) -> float | None:
    """The final model's loss on the training data it saw (final_eval.train_split), or None."""
    results = job.summary.get("train_evaluations") or []
    return results[0]["loss"] if results else None


def sweep_table(sweep_dir: Path | str, jobs: list[JobRecord] | None = None) -> list[dict]:
    """One row per configuration: mean and std over its finished seeds of the final and best validation loss,
    bits per character, the loss at 2x and 4x the training context, the final loss on the training data and its
    gap to validation (when the jobs measured it: final_eval.train_split), tokens/s and wall time."""
    jobs = load_sweep(sweep_dir) if jobs is None else jobs
    rows = []
    for label in dict.fromkeys(job.label for job in jobs):
        group = [j for j in jobs if j.label == label]
        done = [j for j in group if j.status == "finished"]
        metrics = [j.summary["metrics"] for j in done]
        row = {"configuration": readable_numbers(label), "seeds": len(done), "jobs": len(group)}
        row["parameters"] = done[0].summary.get("parameters") if done else None
        row["context"] = done[0].summary.get("seq_length") if done else None
        train_losses = [train_loss(j) for j in done]
        columns = {
            "val_loss": [m.get("val/loss") for m in metrics],
            "best_val_loss": [m.get("val/best_loss", m.get("val/loss")) for m in metrics],
            "val_bpc": [m.get("val/bpc") for m in metrics],
            "val_loss_2x": [_evaluation(j, 2) for j in done],
            "val_loss_4x": [_evaluation(j, 4) for j in done],
            "val_loss_8x": [_evaluation(j, 8) for j in done],
            "train_loss": train_losses,
            "gap": [
                m.get("val/loss") - t if t is not None and m.get("val/loss") is not None else None
                for m, t in zip(metrics, train_losses, strict=True)
            ],
            "tokens_per_s": [
                float(np.mean(j.curves["speed/tokens_per_sec"].values)) if "speed/tokens_per_sec" in j.curves else None
                for j in done
            ],
            "wall_s": [j.summary.get("fit_seconds") for j in done],
        }
        for name, values in columns.items():
            row[name], row[f"{name}_std"] = _mean_std(values)
        rows.append(row)
    return rows


def _cell(mean: float | None, std: float | None, digits: int) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if std else f"{mean:.{digits}f}"


COLUMNS = {  # key: (header, digits); columns with no value in any row are left out
    "val_loss": ("val loss", 4),
    "best_val_loss": ("best val loss", 4),
    "val_bpc": ("val bpc", 4),
    "val_loss_2x": ("loss @2x ctx", 4),
    "val_loss_4x": ("loss @4x ctx", 4),
    "val_loss_8x": ("loss @8x ctx", 4),
    "train_loss": ("train loss", 4),
    "gap": ("val - train", 4),
    "tokens_per_s": ("tokens/s", 0),
    "wall_s": ("wall s", 0),
}


def markdown_table(rows: list[dict]) -> str:
    """The rows of `sweep_table` as a Markdown table; columns no row has a value for are left out."""
    columns = [k for k in COLUMNS if k in ("val_loss", "val_bpc") or any(r[k] is not None for r in rows)]
    header = "| configuration | params | seeds | " + " | ".join(COLUMNS[k][0] for k in columns) + " |"
    lines = [header, "|---|" + "---:|" * (len(columns) + 2)]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "-"
        seeds = f"{r['seeds']}" if r["seeds"] == r["jobs"] else f"{r['seeds']} of {r['jobs']}"
        cells = [r["configuration"], params, seeds]
        cells += [_cell(r[k], r[f"{k}_std"], COLUMNS[k][1]) for k in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
