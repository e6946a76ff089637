"""The loss against context length of a sweep whose jobs read their final model at several multiples of the
training context (final_eval.context_multiples), and, for RoPE jobs, with each context extension
(final_eval.rope_scalings): a table and a plot with standard errors over seeds (length_study)."""

from __future__ import annotations

import math

import numpy as np

from lm.naming import readable_numbers
from lm.report.sweep import JobRecord


def _by_multiple(job: JobRecord, results: list[dict]) -> dict[int, float]:
    seq_length = job.summary.get("eval_base_length") or job.summary.get("seq_length")
    return {
        r["context_length"] // seq_length: r["loss"]
        for r in results
        if seq_length and r.get("loss") is not None and r["context_length"] % seq_length == 0
    }


def _mean_se(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    se = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else None
    return float(np.mean(values)), se


def length_rows(jobs: list[JobRecord]) -> list[dict]:
    """One row per configuration, and per context extension its RoPE jobs were read with ("<configuration> +
    yarn"): {"configuration", "seeds", "multiples": {m: (mean, standard error)}}. Empty unless some job was read
    at three or more lengths or with an extension."""
    done = [j for j in jobs if j.status == "finished"]
    if not any(len(j.summary.get("evaluations") or []) >= 3 or j.summary.get("scaled_evaluations") for j in done):
        return []
    rows = []
    for label in dict.fromkeys(j.label for j in done):
        group = [j for j in done if j.label == label]
        plain = [_by_multiple(j, j.summary.get("evaluations") or []) for j in group]
        variants = {readable_numbers(label): plain}
        for method in dict.fromkeys(m for j in group for m in j.summary.get("scaled_evaluations") or {}):
            # at 1x an extension by a factor of 1 changes nothing: the plain reading
            variants[f"{readable_numbers(label)} + {method}"] = [
                {
                    **{m: loss for m, loss in p.items() if m == 1},
                    **_by_multiple(j, j.summary["scaled_evaluations"][method]),
                }
                for j, p in zip(group, plain, strict=True)
                if method in j.summary.get("scaled_evaluations", {})
            ]
        for name, readings in variants.items():
            multiples = sorted({m for r in readings for m in r})
            rows.append(
                {
                    "configuration": name,
                    "seeds": len(group),
                    "multiples": {m: _mean_se([r.get(m) for r in readings]) for m in multiples},
                }
            )
    return rows


def length_table(rows: list[dict], seq_length: int | None) -> str:
    """The rows as Markdown: loss (nats per character) at each multiple, mean ± standard error."""
    multiples = sorted({m for r in rows for m in r["multiples"]})
    heads = [f"{m}x" + (f" ({m * seq_length})" if seq_length else "") for m in multiples]
    lines = ["| configuration | seeds | " + " | ".join(heads) + " |", "|---|---:|" + "---:|" * len(multiples)]
    for r in rows:
        cells = []
        for m in multiples:
            mean, se = r["multiples"].get(m, (None, None))
            cells.append("n/a" if mean is None else f"{mean:.4f} ± {se:.4f}" if se else f"{mean:.4f}")
        lines.append(f"| {r['configuration']} | {r['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def length_plot(plt, rows: list[dict], seq_length: int | None):
    """Loss against the evaluation context, one line per row, standard errors as bars; None with nothing to draw."""
    drawn = [r for r in rows if sum(mean is not None for mean, _ in r["multiples"].values()) >= 2]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(9, 6))
    styles = ["-", "--", ":", "-."]
    for i, r in enumerate(drawn):
        points = [(m, mean, se or 0.0) for m, (mean, se) in sorted(r["multiples"].items()) if mean is not None]
        x = [m * (seq_length or 1) for m, _, _ in points]
        ax.errorbar(
            x,
            [mean for _, mean, _ in points],
            yerr=[se for _, _, se in points],
            label=r["configuration"],
            marker="o",
            markersize=3,
            capsize=2,
            linestyle=styles[(i // 20) % len(styles)],
            color=plt.cm.tab20(i % 20),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(
        xlabel="evaluation context (characters)",
        ylabel="validation loss (nats per character, log scale)",
        title="Loss against context length (± standard error over seeds)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=6, ncol=2, loc="upper left")
    return fig
