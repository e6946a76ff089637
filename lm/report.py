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


def _train_loss(job: JobRecord) -> float | None:
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
        row = {"configuration": label, "seeds": len(done), "jobs": len(group)}
        row["parameters"] = done[0].summary.get("parameters") if done else None
        row["context"] = done[0].summary.get("seq_length") if done else None
        train_losses = [_train_loss(j) for j in done]
        columns = {
            "val_loss": [m.get("val/loss") for m in metrics],
            "best_val_loss": [m.get("val/best_loss", m.get("val/loss")) for m in metrics],
            "val_bpc": [m.get("val/bpc") for m in metrics],
            "val_loss_2x": [_evaluation(j, 2) for j in done],
            "val_loss_4x": [_evaluation(j, 4) for j in done],
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
    "train_loss": ("train loss", 4),
    "gap": ("val - train", 4),
    "tokens_per_s": ("tokens/s", 0),
    "wall_s": ("wall s", 0),
}


def markdown_table(rows: list[dict]) -> str:
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


@dataclass
class PowerLaw:
    """L = a N^-exponent, fitted by least squares in log-log over every finished job (each seed one point)."""

    a: float
    exponent: float
    exponent_se: float  # the slope's standard error
    points: int

    def __call__(self, n):
        return self.a * np.asarray(n, dtype=float) ** -self.exponent

    def __str__(self) -> str:
        return f"L = {self.a:.3f} N^-({self.exponent:.4f} ± {self.exponent_se:.4f})"


def fit_power_law(parameters: list[float], losses: list[float]) -> PowerLaw:
    """Fits log L = log a - b log N; b's uncertainty is the usual standard error of a least-squares slope."""
    x, y = np.log(np.asarray(parameters, dtype=float)), np.log(np.asarray(losses, dtype=float))
    slope, intercept = np.polyfit(x, y, 1)
    residuals = y - (intercept + slope * x)
    dof = len(x) - 2
    se = float(np.sqrt(residuals @ residuals / dof / np.sum((x - x.mean()) ** 2))) if dof > 0 else float("nan")
    return PowerLaw(float(np.exp(intercept)), float(-slope), se, len(x))


def _sizes_vary(jobs: list[JobRecord]) -> list[JobRecord]:
    """The finished jobs, when model size varies 2x or more across them (not, say, by a learned position table)."""
    done = [j for j in jobs if j.status == "finished" and j.summary.get("parameters") and j.summary.get("metrics")]
    sizes = [j.summary["parameters"] for j in done]
    return done if sizes and max(sizes) >= 2 * min(sizes) else []


@dataclass
class SizeSweep:
    """What a sweep over model size yields: its finished jobs, the power law through them, and each
    configuration's validation curve against training FLOPs (configurations in order of size)."""

    jobs: list[JobRecord]
    law: PowerLaw
    curves: dict[str, tuple[np.ndarray, np.ndarray]]


def size_sweep(jobs: list[JobRecord], rows: list[dict]) -> SizeSweep | None:
    """The `SizeSweep` of a sweep whose model size varies 2x or more (`_sizes_vary`), else None."""
    sized = _sizes_vary(jobs)
    if not sized:
        return None
    law = fit_power_law([j.summary["parameters"] for j in sized], [j.summary["metrics"]["val/loss"] for j in sized])
    order = [r["configuration"] for r in sorted(rows, key=lambda r: r["parameters"] or 0)]
    return SizeSweep(sized, law, compute_curves(jobs, order))


def compute_curves(jobs: list[JobRecord], labels: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each configuration's validation curve against training FLOPs (step x FLOPs per step), mean over seeds."""
    curves = {}
    for label in labels:
        group = [j for j in jobs if j.label == label and "val/loss" in j.curves and j.summary.get("flops_per_step")]
        if not group:
            continue
        n = min(len(j.curves["val/loss"].values) for j in group)
        flops = np.array(group[0].curves["val/loss"].steps[:n], dtype=float) * group[0].summary["flops_per_step"]
        loss = np.mean([j.curves["val/loss"].values[:n] for j in group], axis=0)
        keep = flops > 0
        curves[label] = (flops[keep], loss[keep])
    return curves


def compute_frontier(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[tuple[float, float, str]]:
    """The compute-efficient frontier: walking every validation point of every configuration in order of FLOPs,
    the lowest loss reached so far with at most that many FLOPs; returns the points where it moves down, as
    (FLOPs, loss, configuration)."""
    points = sorted(
        (f, loss, label) for label, (flops, losses) in curves.items() for f, loss in zip(flops, losses, strict=True)
    )
    frontier: list[tuple[float, float, str]] = []
    for flops, loss, label in points:
        if not frontier or loss < frontier[-1][1]:
            frontier.append((float(flops), float(loss), label))
    return frontier


def frontier_handovers(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Which configuration holds the frontier (`compute_frontier`) over which range of FLOPs: each from the start of
    its last stretch on it (where points of two sizes interleave, the frontier alternates before it settles)."""
    frontier = compute_frontier(curves)
    stretches: list[tuple[str, float, float]] = []  # (configuration, FLOPs, loss) where each stretch starts
    for flops, loss, label in frontier:
        if not stretches or stretches[-1][0] != label:
            stretches.append((label, flops, loss))
    last = {label: (flops, loss) for label, flops, loss in stretches}
    first = {}
    for label, flops, _ in stretches:
        first.setdefault(label, flops)
    lines = []
    for label, (flops, loss) in sorted(last.items(), key=lambda item: item[1][0]):
        line = f"{label} from {flops:.2g} FLOPs (loss {loss:.4f})"
        if first[label] != flops:
            line += f", after first reaching it at {first[label]:.2g}"
        lines.append(line)
    if frontier:
        lines.append(f"the lowest loss, {frontier[-1][1]:.4f}, is {frontier[-1][2]}'s, at {frontier[-1][0]:.2g} FLOPs")
    return lines


def write_report(sweep_dir: Path | str) -> dict[str, Path]:
    """Writes results.md, results.csv, val_loss.png, extrapolation.png and, as the sweep's data allows,
    scaling.png and compute.png (model size varies), context.png (context length varies) and train_val.png (the
    jobs measured their loss on the training data) into the sweep dir; returns what it wrote."""
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
    sizes = size_sweep(jobs, rows)
    written.update(_plots(sweep_dir, jobs, rows, sizes))
    not_finished = [j for j in jobs if j.status != "finished"]
    lines = [f"# Results: {sweep_dir.name}", ""]
    lines.append(
        f"{len(jobs)} jobs, {len(jobs) - len(not_finished)} finished; mean ± standard deviation over seeds. "
        "Validation loss in nats per character, over the whole validation split; @2x/@4x: the final model read "
        "with 2x/4x the training context (n/a: learned positions cannot)."
    )
    lines += ["", markdown_table(rows) if rows else "No jobs found.", ""]
    if sizes:
        law = sizes.law
        lines.append(
            f"Final validation loss against parameters N: {law}, by least squares in log-log over {law.points} jobs "
            "(± the slope's standard error)."
        )
        if handovers := frontier_handovers(sizes.curves):
            lines += [
                "",
                "The compute-efficient frontier (the lowest validation loss reached with at most so many FLOPs, "
                "compute.png) is held by:",
            ]
            lines += [f"- {line}" for line in handovers]
        lines.append("")
    if not_finished:
        lines.append("Not finished (failed, or still running):")
        for job in not_finished:
            reason = job.summary.get("error", "no summary.json yet")
            lines.append(f"- `{job.path.name}` ({job.status}): {reason}")
        lines.append("")
    for name in ("val_loss.png", "extrapolation.png", "scaling.png", "compute.png", "context.png", "train_val.png"):
        if name in written:
            lines.append(f"![{name}]({name})")
    written["results.md"].write_text("\n".join(lines) + "\n")
    return written


def _plots(sweep_dir: Path, jobs: list[JobRecord], rows: list[dict], sizes: SizeSweep | None) -> dict[str, Path]:
    """Writes the sweep's figures that its data supports; returns {file name: path}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["configuration"] for r in rows]
    colors = {label: plt.cm.tab10(i % 10) for i, label in enumerate(labels)}
    figures = {
        "val_loss.png": _loss_curves(plt, jobs, labels, colors),
        "extrapolation.png": _extrapolation(plt, jobs, labels, colors),
        "scaling.png": _scaling(plt, sizes, rows) if sizes else None,
        "compute.png": _compute(plt, sizes.curves, colors) if sizes and sizes.curves else None,
        "context.png": _context(plt, rows),
        "train_val.png": _train_val(plt, jobs, labels, colors),
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
            if len(lengths) < 2:  # read at its own length only: nothing to extrapolate
                continue
            means = [np.mean(by_length[n]) for n in lengths]
            stds = [np.std(by_length[n], ddof=1) if len(by_length[n]) > 1 else 0 for n in lengths]
            ax.errorbar(lengths, means, yerr=stds, color=colors[label], label=label, marker="o", capsize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log", base=2)
    return _labelled(fig, ax, "Reading past the training context", "evaluation context length (characters)",
                     "validation bits per character")  # fmt: skip


def _labelled(fig, ax, title: str, xlabel: str, ylabel: str, legend: dict | None = None):
    """Titles and labels a plot, with a light grid and a small legend; returns the figure."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(**(legend or {"fontsize": 8}))
    return fig


def _scaling(plt, sizes: SizeSweep, rows: list[dict]):
    """Final loss against model size: each seed, each configuration's mean, and the fitted power law."""
    sized, law = sizes.jobs, sizes.law
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.plot(
        [j.summary["parameters"] for j in sized],
        [j.summary["metrics"]["val/loss"] for j in sized],
        "o",
        alpha=0.35,
        label="each seed",
    )
    means = [r for r in rows if r["parameters"] and r["val_loss"] is not None]
    ax.errorbar(
        [r["parameters"] for r in means],
        [r["val_loss"] for r in means],
        yerr=[r["val_loss_std"] or 0 for r in means],
        marker="s",
        linestyle="",
        capsize=3,
        color="black",
        label="mean ± std",
    )
    for r in means:
        ax.annotate(r["configuration"], (r["parameters"], r["val_loss"]), fontsize=7, alpha=0.7)
    grid = np.geomspace(min(r["parameters"] for r in means), max(r["parameters"] for r in means), 50)
    ax.plot(grid, law(grid), "--", label=str(law))
    _log_log(plt, ax, "%.2f")
    ax.set(xlabel="parameters", ylabel="final validation loss (nats/char)", title="Scaling with model size")
    ax.legend(fontsize=8)
    return fig


def _compute(plt, curves: dict[str, tuple[np.ndarray, np.ndarray]], colors: dict):
    """Each size's validation curve against training FLOPs, log-log, and the compute-efficient frontier."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (flops, loss) in curves.items():
        ax.plot(flops, loss, marker=".", color=colors[label], label=label)
    frontier = compute_frontier(curves)
    end = max(f[-1] for f, _ in curves.values())
    xs = [f for f, _, _ in frontier] + [end]
    ys = [loss for _, loss, _ in frontier] + [frontier[-1][1]]
    ax.step(
        xs,
        ys,
        where="post",
        color="black",
        linestyle="--",
        linewidth=1,
        alpha=0.6,
        label="frontier: lowest loss with at most so many FLOPs",
    )
    _log_log(plt, ax, "%.1f")
    ax.set(xlabel="training FLOPs (forward + backward)", ylabel="validation loss (nats/char)")
    ax.set_title("Loss against compute, each size (mean over seeds)")
    ax.legend(fontsize=8)
    return fig


def _log_log(plt, ax, minor_format: str) -> None:
    """Log scales on both axes, losses written out as numbers (not powers of ten), a grid at every tick."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(plt.matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(plt.matplotlib.ticker.FormatStrFormatter(minor_format))
    ax.grid(alpha=0.3, which="both")


def _context(plt, rows: list[dict]):
    """Final validation loss against the training context, at that length and at twice it, one line per other
    setting (e.g. the positional encoding), when the context length varies."""
    with_context = [r for r in rows if r["context"] and r["val_loss"] is not None]
    if len({r["context"] for r in with_context}) < 2:
        return None
    groups: dict[str, list[dict]] = {}
    for r in with_context:
        rest = " ".join(p for p in r["configuration"].split() if not p.startswith("data.seq_length=")) or "all runs"
        groups.setdefault(rest, []).append(r)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, (name, group) in enumerate(groups.items()):
        group = sorted(group, key=lambda r: r["context"])
        color = plt.cm.tab10(i % 10)
        x = [r["context"] for r in group]
        ax.errorbar(
            x,
            [r["val_loss"] for r in group],
            yerr=[r["val_loss_std"] or 0 for r in group],
            color=color,
            marker="o",
            capsize=3,
            label=f"{name}, at the trained length",
        )
        at_2x = [(r["context"], r["val_loss_2x"], r["val_loss_2x_std"]) for r in group if r["val_loss_2x"] is not None]
        if at_2x:
            ax.errorbar(
                [a for a, _, _ in at_2x],
                [b for _, b, _ in at_2x],
                yerr=[c or 0 for _, _, c in at_2x],
                color=color,
                marker="s",
                linestyle="--",
                capsize=3,
                label=f"{name}, read at 2x",
            )
    ax.set_xscale("log", base=2)
    return _labelled(fig, ax, "Context length at equal characters per step", "training context (characters)",
                     "final validation loss (nats/char)")  # fmt: skip


def _train_val(plt, jobs: list[JobRecord], labels: list[str], colors: dict):
    """Training loss (the logged batch losses, averaged between validations) and validation loss against steps,
    mean over seeds, when the jobs measured their final loss on the training data."""
    if not any(_train_loss(j) is not None for j in jobs):
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label in labels:
        group = [j for j in jobs if j.label == label and {"val/loss", "train/loss"} <= j.curves.keys()]
        if not group:
            continue
        n = min(len(j.curves["val/loss"].values) for j in group)
        val_steps = np.array(group[0].curves["val/loss"].steps[:n])
        val = np.mean([j.curves["val/loss"].values[:n] for j in group], axis=0)
        edges = np.concatenate([[0], val_steps])
        train = []
        for j in group:
            steps, values = np.array(j.curves["train/loss"].steps), np.array(j.curves["train/loss"].values)
            train.append([values[(steps > a) & (steps <= b)].mean() for a, b in zip(edges, edges[1:], strict=False)])
        ax.plot(val_steps, val, color=colors[label], marker="o", label=f"{label}: validation")
        ax.plot(val_steps, np.nanmean(train, axis=0), color=colors[label], linestyle="--", label=f"{label}: training")
    title = "Training and validation loss (mean over seeds)"
    return _labelled(fig, ax, title, "step", "loss (nats/char)", legend=dict(fontsize=7, ncol=2))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
