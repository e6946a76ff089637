"""Compare the runs of a sweep: a results table (mean ± std over seeds) and plots, written into the sweep dir.

    python scripts/compare.py outputs/multirun/<sweep>

Writes results.md, results.csv, val_loss.png, extrapolation.png and, when model size varies, scaling.png; prints
results.md. Each study (experiment=pe_study, ...) writes it by itself when its last job ends
(`lm.commands.WriteReport`). The logic is `lm.report`, for notebooks: `lm.report.sweep_table(<sweep dir>)`.
"""

import argparse
import sys
from pathlib import Path

from lm.commands import compare_sweep


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a Hydra sweep dir, e.g. outputs/multirun/<date>")
    return compare_sweep(parser.parse_args().sweep_dir)


if __name__ == "__main__":
    sys.exit(main())
