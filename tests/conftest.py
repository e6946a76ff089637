import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Under pytest-xdist (the README's `python -m pytest` runs two workers: pyproject's addopts), each worker and the
# scripts it starts get an equal share of the cores. torch's default, every core in every process, oversubscribes
# them, and OpenMP threads spinning for a core slow every test down (a dropout test: 50 s, with its share < 13 s).
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by scripts/train.py and friends run as subprocesses
    torch.set_num_threads(threads)


def make_corpus_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A deterministic pseudo-English corpus with some structure a tiny model can learn."""
    import random

    rng = random.Random(seed)
    words = ["the", "king", "queen", "lord", "of", "and", "to", "my", "thou", "art", "shall", "be", "love"]
    lines = []
    while sum(len(line) + 1 for line in lines) < n_chars:
        line = " ".join(rng.choice(words) + rng.choice(["", "", "", ","]) for _ in range(rng.randint(3, 9)))
        lines.append(line.rstrip(",").capitalize() + rng.choice([".", ".", "!", "?"]))
    return "\n".join(lines)[:n_chars]


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text())
    return path
