"""Turns a sweep directory (one Hydra multirun) into a results table and plots.

    from lm.report import sweep_table
    rows = sweep_table("outputs/multirun/pe_study/2026-11-26_01-00-00")   # one dict per configuration

- sweep: reading a sweep's jobs and their curves, and the table of configurations (mean ± std over seeds)
- scaling: the power law over model sizes and the compute-efficient frontier
- plots: the figures
- writer: `write_sweep_report`, which writes all of it into the sweep directory
"""

from lm.report.scaling import PowerLaw, compute_frontier, fit_power_law, frontier_handovers
from lm.report.sweep import JobRecord, load_sweep, markdown_table, sweep_table
from lm.report.writer import write_sweep_report

__all__ = [
    "JobRecord",
    "PowerLaw",
    "compute_frontier",
    "fit_power_law",
    "frontier_handovers",
    "load_sweep",
    "markdown_table",
    "sweep_table",
    "write_sweep_report",
]
