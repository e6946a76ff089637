"""Model-size sweeps: the power law of final loss against parameters, and the compute-efficient frontier."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lm.report.sweep import JobRecord


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
