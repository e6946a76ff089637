"""Checkpoints written before the package took over the run path still load: tests/fixtures/run_v1 is a tiny run
(1 layer x 16, RoPE, 4 steps of a corpus that `make_corpus_text(3000)` makes again) written by the code of commit
7528168. Each way in is tried: resume=, ckpt_path=, generate.py, evaluate.py and `lm.load_model`."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT, last_checkpoint, make_corpus_text

from lm import generate, load_model

FIXTURE = ROOT / "tests" / "fixtures" / "run_v1"
CORPUS_SHA256 = "f7c43a032885beb5fe379b0edc874b183cb8b291072f05723accac1c897486c8"  # its corpus, as recorded


@pytest.fixture
def old_run(tmp_path) -> tuple[Path, Path]:
    """A copy of the old run directory, and its corpus made again (the same bytes it trained on)."""
    run = tmp_path / "run_v1"
    shutil.copytree(FIXTURE, run)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus_text(3000, seed=0))
    return run, corpus


def test_the_fixture_is_what_its_docstring_says(old_run):
    run, corpus = old_run
    checkpoint = last_checkpoint(run)
    assert checkpoint["global_step"] == 4 and checkpoint["transformer_lm"]["format"] == 1
    assert checkpoint["transformer_lm"]["data"]["sha256"] == CORPUS_SHA256
    import hashlib

    assert hashlib.sha256(corpus.read_bytes()).hexdigest() == CORPUS_SHA256
    assert (FIXTURE / "checkpoints" / "last.ckpt").stat().st_size < 100_000


# the fixture's run was written in another folder: Lightning says so when a copy of it resumes (a user who moves a
# run sees it too, rightly: the best score so far is not carried over)
MOVED_RUN = pytest.mark.filterwarnings("ignore:The dirpath has changed")


@MOVED_RUN
def test_an_old_run_resumes_from_its_last_step(old_run, tmp_path, cli):
    run, corpus = old_run
    result = cli.train([f"resume={run}", f"data.path={corpus}", "trainer.max_steps=8"], tmp_path)
    assert "[transformer-lm] final val/best_loss=" in result.stderr
    checkpoint = last_checkpoint(run)
    assert checkpoint["global_step"] == 8
    assert checkpoint["transformer_lm"]["model_config"]["n_embd"] == 16  # the run's own settings came back
    assert (run / ".hydra" / "resumed_at_4" / "config.yaml").is_file()


@MOVED_RUN
def test_an_old_checkpoint_fine_tunes_with_ckpt_path(old_run, tmp_path, cli):
    run, corpus = old_run
    size = ["model=tiny", "model.n_layer=1", "model.n_head=2", "model.n_embd=16", "data.seq_length=16"]
    args = [f"data.path={corpus}", *size, "data.batch_size=4", "trainer.max_steps=6", "logger=csv"]
    cli.train([*args, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"], tmp_path)
    (new_run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert last_checkpoint(new_run)["global_step"] == 6


def test_an_old_checkpoint_generates_and_evaluates(old_run, tmp_path, cli):
    run, corpus = old_run
    ckpt = run / "checkpoints" / "last.ckpt"
    model, tokenizer = load_model(ckpt)
    assert model.config.n_layer == 1 and model.config.pos_encoding.name == "rope"
    text = generate(model, tokenizer, "The", max_new_tokens=20, temperature=0, seed=0)[0]
    assert len(text) == 23 and text.startswith("The")
    out = cli.script("generate.py", f"ckpt={ckpt}", "prompt=The", "max_new_tokens=20", "temperature=0")
    assert out.stdout.strip() == text.strip()
    result = cli.script("evaluate.py", f"ckpt={ckpt}", f"data.path={corpus}", f"output={tmp_path / 'old'}")
    assert "| 16 |" in result.stdout and (tmp_path / "old.eval.json").is_file()
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 16, dtype=torch.long))).all()
