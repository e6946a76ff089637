"""What the tests share: tiny settings, corpora, models, and ways to run the package's commands.

A run is trained in-process with `train_in_process` (a config from Hydra's compose API, then `lm.train.train`), as
the lightning-hydra-template's tests do. `run_train` and `run_script` run a script's command line: given pytest's
`in_process=True`, in this process (`runpy`, its exit status from SystemExit, its output captured), which spares a
Python start-up and the imports; else as a subprocess, kept where a separate process is what is under test: signals,
the console as a user sees it (Python's warnings included), DDP, parallel launchers.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lm.config import compose_config
from lm.model import Transformer, TransformerConfig
from lm.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model=tiny",
    "data.seq_length=32",
    "data.batch_size=8",
    "trainer.val_check_interval=100",
    "callbacks.text_sample.max_new_tokens=20",
    "callbacks.throughput.peak_flops=null",
]
FAST = [*TINY, "trainer.precision=32-true", "logger=csv"]
VOCAB = "".join(sorted(set("\n !',.:;?abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")))


def make_corpus_text(n_chars: int = 6000, seed: int = 0) -> str:
    """A deterministic pseudo-English corpus with some structure a tiny model can learn."""
    rng = random.Random(seed)
    words = ["the", "king", "queen", "lord", "of", "and", "to", "my", "thou", "art", "shall", "be", "love"]
    lines = []
    while sum(len(line) + 1 for line in lines) < n_chars:
        line = " ".join(rng.choice(words) + rng.choice(["", "", "", ","]) for _ in range(rng.randint(3, 9)))
        lines.append(line.rstrip(",").capitalize() + rng.choice([".", ".", "!", "?"]))
    return "\n".join(lines)[:n_chars]


# ----------------------------------------------------------------------------------------------------------------
# Runs


def train_in_process(overrides: list[str], tmp_path: Path, name: str = "run") -> tuple[dict, Path]:
    """Trains `scripts/train.py <overrides>`'s run in this process, into <tmp_path>/outputs/runs/<name>; returns
    its final metrics and its run directory."""
    run_dir = tmp_path / "outputs" / "runs" / name
    cfg = compose_config(
        [
            f"paths.output_dir={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'data'}",
            *overrides,
            f"paths.run_dir={run_dir}",
        ]
    )
    return train(cfg), run_dir


def run_train(args, tmp_path, check=True, python_warnings: str | None = "ignore", in_process=False):
    """`python scripts/train.py <args>` with outputs and data under `tmp_path` (see the module's docstring)."""
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    paths = [f"paths.output_dir={tmp_path / 'outputs'}", f"paths.data_dir={tmp_path / 'data'}"]
    if in_process:
        return run_script("train.py", *flags, *paths, *overrides, check=check, in_process=True)
    env = {**os.environ, **({"PYTHONWARNINGS": python_warnings} if python_warnings else {})}
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *flags, *paths, *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def run_script(name, *args, check=True, in_process=False):
    """`python scripts/<name> <args>`, its output captured: a subprocess, or with `in_process` this process."""
    if in_process:
        result = run_in_process(ROOT / "scripts" / name, list(args))
    else:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, str(ROOT / "scripts" / name), *args]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"{name} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def run_in_process(script: Path, args: list[str]) -> subprocess.CompletedProcess:
    """Runs `script` as `python script <args>` would, in this process: its exit status (from SystemExit), stdout
    and stderr. Environment variables a command sets are put back afterwards."""
    argv, environ = sys.argv, dict(os.environ)
    out, err = io.StringIO(), io.StringIO()
    sys.argv = [str(script), *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
        code = 0
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(environ)
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())


def only_run(outputs: Path) -> Path:
    runs = list((outputs / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


# ----------------------------------------------------------------------------------------------------------------
# What a run wrote


def last_checkpoint(run: Path) -> dict:
    return torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def csv_column(run: Path, column: str) -> list[float]:
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    index = lines[0].split(",").index(column)
    return [float(row.split(",")[index]) for row in lines[1:] if row.split(",")[index]]


def scalars(run_dir: Path) -> dict[str, list[float]]:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def hparams_of(run_dir: Path) -> dict:
    """The HParams plugin's data in a run's event file: its hyperparameters, checked to declare our metrics."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(run_dir))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"val/loss", "val/bpc", "val/best_loss"}
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    return {k: v.string_value or v.number_value or v.bool_value for k, v in start.hparams.items()}


def custom_scalars_layout(run_dir: Path) -> list[tuple[str, list[str]]]:
    """The Custom Scalars tab's layout in a run's event file: (category, its charts' tag patterns)."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    layout = layout_pb2.Layout.FromString(events.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    return [(c.title, [chart.multiline.tag[0] for chart in c.chart]) for c in layout.category]


def text_samples(run_dir: Path) -> list[int]:
    """The steps at which a text sample was logged."""
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0})
    events.Reload()
    return [e.step for e in events.Tensors("sample/text_summary")]


# ----------------------------------------------------------------------------------------------------------------
# Models


def random_model(pe: str, seq_length: int = 24) -> Transformer:
    """Two layers over VOCAB with larger weights than at initialisation: varied text, and greedy choices that are
    not near-ties."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=len(VOCAB), seq_length=seq_length, n_layer=2, n_head=2, n_embd=32, pos_encoding={"name": pe}
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.5)
    return model


def tiny_model(pe: str = "learned") -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=13, seq_length=16, n_layer=2, n_head=2, n_embd=16, bias=True)
    config.pos_encoding.name = pe
    return Transformer(config)


def loss_of(model: Transformer, batch: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
