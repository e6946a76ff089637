"""A sweep's report: results.md, results.csv and the figures, written into the sweep directory."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

from lm.report.length import length_plot, length_rows, length_table
from lm.report.plots import write_plots
from lm.report.scaling import frontier_handovers, size_sweep
from lm.report.sweep import load_sweep, markdown_table, sweep_table
from lm.sweep import continue_command, states_line, stop_signal


def write_sweep_report(sweep_dir: Path | str) -> dict[str, Path]:
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
    written.update(write_plots(sweep_dir, jobs, rows, sizes))
    lengths = length_rows(jobs)
    seq_lengths = {
        j.summary.get("eval_base_length") or j.summary.get("seq_length") for j in jobs if j.status == "finished"
    }
    seq_length = seq_lengths.pop() if len(seq_lengths) == 1 else None  # the table's headings name it when shared
    if lengths:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if (fig := length_plot(plt, lengths, seq_length)) is not None:
            written["length.png"] = sweep_dir / "length.png"
            fig.savefig(written["length.png"], dpi=120, bbox_inches="tight")
            plt.close(fig)
    not_finished = [j for j in jobs if j.status != "finished"]
    lines = [f"# Results: {sweep_dir.name}", ""]
    if signum := stop_signal(sweep_dir):
        lines.append(
            f"**Partial: {signal.Signals(signum).name} stopped this sweep before {len(not_finished)} of its jobs "
            f"finished** (listed below); `{continue_command(sweep_dir)}` runs them and writes this report again."
        )
        lines.append("")
    longer = [m for m in ("2x", "4x", "8x") if any(r.get(f"val_loss_{m}") is not None for r in rows)]
    header = (
        f"{len(jobs)} jobs: {states_line([j.status for j in jobs])}; mean ± standard deviation over finished seeds. "
        "Validation loss in nats per character, over the whole validation split"
    )
    if longer:  # only where the table has those columns
        at = "/".join(f"@{m}" for m in longer)
        header += f"; {at}: the final model read with {'/'.join(longer)} the training context"
        header += " (n/a: learned positions cannot)"
    lines.append(header + ".")
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
    if lengths:
        lines += [
            "Validation loss against the context the final model reads (nats per character, mean ± standard error "
            "over seeds; '+ method': a RoPE model read with that context extension by the factor each length needs, "
            "no training; n/a: learned positions cannot):",
            "",
            length_table(lengths, seq_length),
            "",
        ]
    if not_finished:
        lines.append("Not finished:")
        lines += [f"- `{job.path.name}`: {job.state}" for job in not_finished]
        lines.append("")
    figures = ("val_loss.png", "extrapolation.png", "length.png", "scaling.png", "compute.png", "context.png")
    for name in (*figures, "train_val.png"):
        if name in written:
            lines.append(f"![{name}]({name})")
    written["results.md"].write_text("\n".join(lines) + "\n")
    return written
