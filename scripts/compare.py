"""Compare the runs of a sweep: a results table (mean ± std over seeds) and plots, written into the sweep dir.

    python scripts/compare.py outputs/multirun/<sweep>

Writes results.md, results.csv, val_loss.png, extrapolation.png and, when model size varies, scaling.png; prints
results.md. Each study (experiment=pe_study, ...) calls it by itself when its last job ends (`WriteReport`).
The logic is `lm.report`, for notebooks: `lm.report.sweep_table(<sweep dir>)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _common import ROOT  # noqa: F401  (puts the project on sys.path when it is not installed)
from hydra.experimental.callback import Callback

from lm.report import write_report


def compare(sweep_dir: Path) -> int:
    if not sweep_dir.is_dir():
        print(
            f"error: {sweep_dir} is not a directory; pass a sweep dir such as outputs/multirun/<date>.", file=sys.stderr
        )
        return 1
    written = write_report(sweep_dir)
    print(written["results.md"].read_text())
    print(f"[compare] wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    return 0


class WriteReport(Callback):
    """A Hydra callback: writes the sweep's report when its last job has ended (hydra.callbacks in a study)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        compare(Path(config.hydra.sweep.dir))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep dir, e.g. outputs/multirun/<date>")
    return compare(parser.parse_args().sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
