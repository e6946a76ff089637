"""The sweep report's figures: loss curves, extrapolation, scaling, compute, context and train/val plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lm.report.scaling import SizeSweep, compute_frontier
from lm.report.sweep import JobRecord, train_loss


def write_plots(sweep_dir: Path, jobs: list[JobRecord], rows: list[dict], sizes: SizeSweep | None) -> dict[str, Path]:
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
    if not any(train_loss(j) is not None for j in jobs):
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
        train = []  # per job, the mean of the batch losses logged since the previous validation (NaN: none)
        for j in group:
            steps, values = np.array(j.curves["train/loss"].steps), np.array(j.curves["train/loss"].values)
            between = [values[(steps > a) & (steps <= b)] for a, b in zip(edges, edges[1:], strict=False)]
            train.append([part.mean() if part.size else np.nan for part in between])
        train = np.array(train)
        logged = ~np.isnan(train).all(axis=0)  # validations after which some job logged a training loss
        ax.plot(val_steps, val, color=colors[label], marker="o", label=f"{label}: validation")
        mean = np.nanmean(train[:, logged], axis=0)
        ax.plot(val_steps[logged], mean, color=colors[label], linestyle="--", label=f"{label}: training")
    title = "Training and validation loss (mean over seeds)"
    return _labelled(fig, ax, title, "step", "loss (nats/char)", legend=dict(fontsize=7, ncol=2))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
