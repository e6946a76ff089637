import os
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import make_corpus_text, run_script, run_train

# Under pytest-xdist (the README's `python -m pytest` runs two workers: pyproject's addopts), each worker and the
# scripts it starts get an equal share of the cores. torch's default, every core in every process, oversubscribes
# them, and OpenMP threads spinning for a core slow every test down.
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by scripts/train.py and friends run as subprocesses
    torch.set_num_threads(threads)


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus_text())
    return path


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """The commands' warning filters (lm.console), which pytest replaces with its own around every test: installed
    again before the test's fixtures (a module's trained run included), so the warnings summary lists what a user
    would see."""
    from lm.console import quiet_library_warnings

    quiet_library_warnings()


@pytest.fixture(autouse=True)
def no_hydra_state_between_tests():
    """Hydra keeps global state (the composed config, the config search path): each test starts without it."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


@pytest.fixture
def cli():
    """The scripts' command lines run in this process: `cli.train(args, tmp_path)` as helpers.run_train, and
    `cli.script(name, *args)` as helpers.run_script, each returning the exit status and the captured output."""
    return SimpleNamespace(train=partial(run_train, in_process=True), script=partial(run_script, in_process=True))
