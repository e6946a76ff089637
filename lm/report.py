"""Turns a sweep directory (one Hydra multirun) into a results table and plots.

    from lm.report import sweep_table
    rows = sweep_table("outputs/multirun/pe_study/2026-11-26_01-00-00")   # one dict per configuration

Each job directory of the sweep holds `.hydra/overrides.yaml` (what the job changed), TensorBoard event files
(read in full, not TensorBoard's default sample) and, once it has finished, `summary.json` (final metrics, wall
time, parameters and the evaluations at several context lengths). Jobs that are given the same overrides except
`seed` form one configuration; numbers are mean and standard deviation over its finished seeds. Failed and
unfinished jobs are listed, never fatal.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

# tensorboard's reader logs every file it finishes at INFO, which Hydra's logging would print
logging.getLogger("tensorboard").setLevel(logging.WARNING)

# overrides that never tell configurations apart
IGNORED_OVERRIDES = ("seed", "experiment", "hparams_search")


@dataclass
class Curve:
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)  # since the run's first event
    values: list[float] = field(default_factory=list)


@dataclass
class JobRecord:
    """One job of a sweep: where it is, what it changed, how it ended, and what it logged."""

    path: Path
    overrides: list[str]
    status: str  # finished | failed | incomplete (failed without a summary, or still running)
    summary: dict
    curves: dict[str, Curve]
    label: str = ""

    @property
    def seed(self) -> str | None:
        return next((o.split("=", 1)[1] for o in self.overrides if o.split("=", 1)[0] == "seed"), None)


def read_curves(run_dir: Path, tags: tuple[str, ...] = ("val/loss", "speed/tokens_per_sec")) -> dict[str, Curve]:
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


def load_sweep(sweep_dir: Path | str) -> list[JobRecord]:
    """Every job of the sweep, labelled by the overrides that differ between configurations."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory; pass a sweep dir such as outputs/multirun/<date>.")
    jobs = []
    for overrides_file in sorted(sweep_dir.glob("*/.hydra/overrides.yaml"), key=_job_order):
        job_dir = overrides_file.parent.parent
        overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        summary_file = job_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
        status = summary.get("status", "incomplete")
        jobs.append(JobRecord(job_dir, overrides, status, summary, read_curves(job_dir)))
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
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def _evaluation(job: JobRecord, multiple: int) -> float | None:
    seq_length = job.summary.get("seq_length")
    for result in job.summary.get("evaluations", []):
        if seq_length and result["context_length"] == multiple * seq_length:
            return result["loss"]
    return None


def sweep_table(sweep_dir: Path | str, jobs: list[JobRecord] | None = None) -> list[dict]:
    """One row per configuration: mean and std over its finished seeds of the final and best validation loss,
    bits per character, the loss at 2x and 4x the training context, tokens/s and wall time."""
    jobs = load_sweep(sweep_dir) if jobs is None else jobs
    rows = []
    for label in dict.fromkeys(job.label for job in jobs):
        group = [j for j in jobs if j.label == label]
        done = [j for j in group if j.status == "finished"]
        metrics = [j.summary["metrics"] for j in done]
        row = {"configuration": label, "seeds": len(done), "jobs": len(group)}
        row["parameters"] = done[0].summary.get("parameters") if done else None
        columns = {
            "val_loss": [m.get("val/loss") for m in metrics],
            "best_val_loss": [m.get("val/best_loss", m.get("val/loss")) for m in metrics],
            "val_bpc": [m.get("val/bpc") for m in metrics],
            "val_loss_2x": [_evaluation(j, 2) for j in done],
            "val_loss_4x": [_evaluation(j, 4) for j in done],
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


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| configuration | params | seeds | val loss | best val loss | val bpc | loss @2x ctx | loss @4x ctx "
        "| tokens/s | wall s |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        params = f"{r['parameters'] / 1e6:.2f}M" if r["parameters"] else "-"
        seeds = f"{r['seeds']}" if r["seeds"] == r["jobs"] else f"{r['seeds']} of {r['jobs']}"
        cells = [r["configuration"], params, seeds]
        for name in ("val_loss", "best_val_loss", "val_bpc", "val_loss_2x", "val_loss_4x", "tokens_per_s", "wall_s"):
            cells.append(_cell(r[name], r[f"{name}_std"], 0 if name in ("tokens_per_s", "wall_s") else 4))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(sweep_dir: Path | str) -> dict[str, Path]:
    """Writes results.md, results.csv, val_loss.png, extrapolation.png and (when model size varies) scaling.png
    into the sweep dir; returns what it wrote."""
    sweep_dir = Path(sweep_dir)
    jobs = load_sweep(sweep_dir)
    rows = sweep_table(sweep_dir, jobs)
    written = {"results.md": sweep_dir / "results.md", "results.csv": sweep_dir / "results.csv"}
    if rows:
        with open(written["results.csv"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        written["results.csv"].write_text("")
    written.update(_plots(sweep_dir, jobs, rows))
    not_finished = [j for j in jobs if j.status != "finished"]
    lines = [f"# Results: {sweep_dir.name}", ""]
    lines.append(
        f"{len(jobs)} jobs, {len(jobs) - len(not_finished)} finished; mean ± standard deviation over seeds. "
        "Validation loss in nats per character, over the whole validation split; @2x/@4x: the final model read "
        "with 2x/4x the training context (n/a: learned positions cannot)."
    )
    lines += ["", markdown_table(rows) if rows else "No jobs found.", ""]
    if not_finished:
        lines.append("Not finished (failed, or still running):")
        for job in not_finished:
            reason = job.summary.get("error", "no summary.json yet")
            lines.append(f"- `{job.path.name}` ({job.status}): {reason}")
        lines.append("")
    for name in ("val_loss.png", "extrapolation.png", "scaling.png"):
        if name in written:
            lines.append(f"![{name}]({name})")
    written["results.md"].write_text("\n".join(lines) + "\n")
    return written


def _plots(sweep_dir: Path, jobs: list[JobRecord], rows: list[dict]) -> dict[str, Path]:
    """Writes the sweep's figures that its data supports; returns {file name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["configuration"] for r in rows]
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    figures = {
        "val_loss.png": _loss_curves(plt, jobs, labels, colors),
        "extrapolation.png": _extrapolation(plt, jobs, labels, colors),
        "scaling.png": _scaling(plt, rows),
    }
    written = {}
    for name, fig in figures.items():
        if fig is not None:
            written[name] = _save(fig, sweep_dir / name)
            plt.close(fig)
    return written


def _loss_curves(plt, jobs: list[JobRecord], labels: list[str], colors: dict):
    """Validation loss against step and against wall time: the mean over seeds, their range as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    drawn = False
    for label in labels:
        curves = [j.curves["val/loss"] for j in jobs if j.label == label and "val/loss" in j.curves]
        if not curves:
            continue
        n = min(len(c.values) for c in curves)
        values = np.array([c.values[:n] for c in curves])
        for ax, x in zip(
            axes, (np.array(curves[0].steps[:n]), np.mean([c.seconds[:n] for c in curves], 0)), strict=True
        ):
            ax.plot(x, values.mean(0), color=colors[label], label=f"{label} ({len(curves)})", marker=".")
            if len(curves) > 1:
                ax.fill_between(x, values.min(0), values.max(0), color=colors[label], alpha=0.2)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    axes[0].set(xlabel="step", ylabel="validation loss (nats/char)", title="against steps")
    axes[1].set(xlabel="wall time (s)", title="against wall time (mean over seeds)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, title="configuration (seeds)")
    return fig


def _extrapolation(plt, jobs: list[JobRecord], labels: list[str], colors: dict):
    """Bits per character against the context length the final model reads."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    drawn = False
    for label in labels:
        done = [j for j in jobs if j.label == label and j.status == "finished" and j.summary.get("evaluations")]
        by_length: dict[int, list[float]] = {}
        for job in done:
            for result in job.summary["evaluations"]:
                if result["bpc"] is not None:
                    by_length.setdefault(result["context_length"], []).append(result["bpc"])
        if by_length:
            lengths = sorted(by_length)
            means = [np.mean(by_length[n]) for n in lengths]
            stds = [np.std(by_length[n], ddof=1) if len(by_length[n]) > 1 else 0 for n in lengths]
            ax.errorbar(lengths, means, yerr=stds, color=colors[label], label=label, marker="o", capsize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    ax.set(xlabel="evaluation context length (characters)", ylabel="validation bits per character")
    ax.set_title("Reading past the training context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _scaling(plt, rows: list[dict]):
    """Final loss against model size with a fitted power law L = a * N^-b, when the size varies 2x or more (not
    just, say, by a learned position table)."""
    sized = [r for r in rows if r["parameters"] and r["val_loss"] is not None]
    sizes = [r["parameters"] for r in sized]
    if not sizes or max(sizes) < 2 * min(sizes):
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    n = np.array(sizes, dtype=float)
    loss = np.array([r["val_loss"] for r in sized])
    ax.errorbar(n, loss, yerr=[r["val_loss_std"] or 0 for r in sized], marker="o", linestyle="", capsize=3)
    for r in sized:
        ax.annotate(r["configuration"], (r["parameters"], r["val_loss"]), fontsize=7, alpha=0.7)
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    grid = np.geomspace(n.min(), n.max(), 50)
    ax.plot(grid, np.exp(intercept) * grid**slope, "--", label=f"L = {np.exp(intercept):.2f} N^{slope:.3f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set(xlabel="parameters", ylabel="final validation loss (nats/char)", title="Scaling with model size")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
