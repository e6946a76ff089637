import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
