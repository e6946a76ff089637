"""Runs that cannot go on end with one sentence: resume mismatches, damaged checkpoints, a full disk, GPU memory."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, last_checkpoint, make_corpus_text, only_run, run_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """A 10-step tiny run (its directory) and the corpus it trained on."""
    folder = tmp_path_factory.mktemp("trained")
    corpus = folder / "corpus.txt"
    corpus.write_text(make_corpus_text())
    run_train([f"data.path={corpus}", *FAST, "trainer.max_steps=10"], folder, in_process=True)
    return only_run(folder / "outputs"), corpus


# Lightning's notice when a run goes on from a checkpoint written in another folder (a copy of the module's run, or
# ckpt_path= into a new run): its best-checkpoint bookkeeping starts afresh there, as these tests expect
MOVED_RUN = pytest.mark.filterwarnings("ignore:The dirpath has changed")


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "change,message",
    [
        (
            ["model=small"],
            "the checkpoint's model has model.n_layer=2 model.n_head=2 model.n_embd=32, but this run asks for "
            "model.n_layer=4 model.n_head=4 model.n_embd=256; pass model.n_layer=2",
        ),
        (
            ["pos_encoding=alibi"],
            "the checkpoint's model has pos_encoding=rope, but this run asks for pos_encoding=alibi",
        ),
        (["data.seq_length=64"], "model has data.seq_length=32, but this run asks for data.seq_length=64"),
        (
            "vocabulary",
            "the checkpoint's vocabulary has 35 characters and this corpus's 38 ('XYZ' only in this corpus)",
        ),
        ("corpus", "a resumed run goes on with its own data, so pass data.path="),
        (["trainer.max_steps=8"], "is at step 10 and trainer.max_steps=8 counts from the start of that run"),
    ],
)
def test_resume_refuses_what_it_cannot_continue_before_loading(tmp_path, trained, change, message, cli):
    run, corpus = trained
    before = {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    if change in ("vocabulary", "corpus"):
        corpus = tmp_path / "other.txt"
        corpus.write_text(make_corpus_text(seed=1) + ("XYZ" if change == "vocabulary" else ""))
        change = []
    result = cli.train(
        [f"data.path={corpus}", *FAST, "trainer.max_steps=20", *change, f"resume={run}"], tmp_path, False
    )
    line = one_error_line(result)
    assert line.startswith(f"error: resume={run}") and message in line, line
    assert {p.name: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before, "the run dir changed"


@pytest.mark.parametrize(
    "trained_with,change",
    [
        ([], ["pos_encoding=alibi"]),
        ([], ["model.qk_norm=true", "model.logit_softcap=30"]),
        (["pos_encoding=alibi", "model.mlp=relu2"], ["pos_encoding=rope", "model.mlp=gelu"]),
    ],
)
@MOVED_RUN
def test_the_fix_a_refused_resume_suggests_runs_as_printed(tmp_path, trained, trained_with, change, cli):
    run, corpus = trained
    if trained_with:
        run_train(
            [f"data.path={corpus}", *FAST, "trainer.max_steps=10", *trained_with], tmp_path / "a", in_process=True
        )
        run = only_run(tmp_path / "a" / "outputs")
    else:
        shutil.copytree(run, tmp_path / "run")  # the module's run stays as it is for the other tests
        run = tmp_path / "run"
    args = [f"data.path={corpus}", *FAST, "trainer.max_steps=12"]
    line = one_error_line(cli.train([*args, *change, f"resume={run}"], tmp_path, False))
    suggested = line.split("; pass ", 1)[1].split(" (or the model=", 1)[0].split()
    assert not any(("True" in s or "False" in s or "None" in s) for s in suggested), line
    result = cli.train([*args, *change, *suggested, f"resume={run}"], tmp_path, False)
    assert result.returncode == 0, (line, result.stderr[-2000:])
    assert last_checkpoint(run)["global_step"] == 12


@MOVED_RUN
def test_fine_tuning_on_another_corpus_says_so_in_one_line(tmp_path, trained, cli):
    run, _ = trained
    other = tmp_path / "other.txt"
    other.write_text(make_corpus_text(seed=1))  # the same characters, other text
    ckpt = run / "checkpoints" / "last.ckpt"
    result = cli.train([f"data.path={other}", *FAST, "trainer.max_steps=15", f"ckpt_path={ckpt}"], tmp_path)
    notes = [line for line in result.stderr.splitlines() if "fine-tuning" in line]
    assert len(notes) == 1 and f"{ckpt} was trained on" in notes[0] and "from its step 10" in notes[0], notes
    assert last_checkpoint(only_run(tmp_path / "outputs"))["global_step"] == 15


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_checkpoint_is_one_sentence_for_resume_and_ckpt_path(tmp_path, trained, damage, cli):
    run, corpus = trained
    damaged = tmp_path / "run"
    (damaged / "checkpoints").mkdir(parents=True)
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    ckpt = damaged / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a checkpoint\n")
    for option in (f"resume={damaged}", f"ckpt_path={ckpt}"):
        result = cli.train([f"data.path={corpus}", *FAST, "trainer.max_steps=20", option], tmp_path, False)
        line = one_error_line(result)
        assert line.startswith(f"error: {ckpt} is truncated or not a PyTorch checkpoint"), line
        assert line.endswith("use an intact .ckpt file."), line


def run_train_with(patch: str, args: list[str], outputs: Path) -> subprocess.CompletedProcess:
    """scripts/train.py with `patch` (Python run first in the same process) standing in for a failing machine."""
    script = (
        f"import runpy, sys\n{patch}\n"
        f"sys.argv = ['train.py', *{[f'paths.output_dir={outputs}', *args]!r}]\n"
        f"runpy.run_path({str(ROOT / 'scripts' / 'train.py')!r}, run_name='__main__')\n"
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_a_full_disk_while_checkpointing_ends_the_run_with_one_sentence(tmp_path, corpus):
    # the third checkpoint write (best, last, then best again at step 4) writes part of the file, then the disk is full
    patch = """
import errno, torch
real_save, calls = torch.save, []
def save(obj, file, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        file.write(b"PK half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_save(obj, file, *args, **kwargs)
torch.save = save
"""
    result = run_train_with(
        patch, [f"data.path={corpus}", *FAST, "trainer.max_steps=10", "trainer.val_check_interval=2"], tmp_path
    )
    line = one_error_line(result)
    run = only_run(tmp_path)
    assert line.startswith(f"error: Could not write {run / 'checkpoints' / 'best.ckpt'} (No space left on device)")
    assert "it needs about " in line and " are free there" in line
    assert f"the last intact checkpoint is {run / 'checkpoints' / 'last.ckpt'}" in line
    assert line.endswith(f"then continue with resume={run}.")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial file
    assert last_checkpoint(run)["global_step"] == 2


def test_gpu_out_of_memory_names_the_batch_the_model_and_what_to_lower(tmp_path, corpus):
    patch = """
import torch
from lm.module import LanguageModel
def training_step(self, batch, batch_idx):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.10 GiB total capacity)")
LanguageModel.training_step = training_step
"""
    result = run_train_with(patch, [f"data.path={corpus}", *FAST, "trainer.max_steps=10"], tmp_path)
    line = one_error_line(result)
    assert line.startswith("error: The GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB")
    assert "0.03M parameters (2 layers x 32 wide) on data.batch_size=8 x data.seq_length=32" in line
    assert "data.batch_size=4 trainer.accumulate_grad_batches=2 keeps the tokens per step" in line


def test_background_checkpoints_are_point_in_time_and_a_failed_write_stops_the_next_save(tmp_path, monkeypatch):
    import errno
    import threading

    import lm.checkpoint_io

    writer = lm.checkpoint_io.BackgroundCheckpointIO()
    release, writing = threading.Event(), []
    real_save = torch.save

    def slow_save(obj, file):
        writing.append(threading.current_thread() is not threading.main_thread())
        release.wait(10)
        real_save(obj, file)

    monkeypatch.setattr(lm.checkpoint_io.torch, "save", slow_save)
    weights = torch.ones(3)
    writer.save_checkpoint({"weights": weights}, tmp_path / "a.ckpt")  # returns while the write waits
    weights.add_(1)  # training goes on: the checkpoint keeps the state it was asked for
    assert not (tmp_path / "a.ckpt").exists()
    release.set()
    writer.wait()
    assert writing == [True] and torch.load(tmp_path / "a.ckpt", weights_only=True)["weights"].sum() == 3

    queued = threading.Event()

    def disk_full_for_b(obj, file):  # b's write fails once c's is queued behind it; c would fit
        if ".b.ckpt." in file.name:
            queued.wait(10)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, file)

    monkeypatch.setattr(lm.checkpoint_io.torch, "save", disk_full_for_b)
    writer.save_checkpoint({"weights": weights}, tmp_path / "b.ckpt")
    writer.save_checkpoint({"weights": weights}, tmp_path / "c.ckpt")
    queued.set()
    with pytest.raises(lm.checkpoint_io.CheckpointWriteError, match="Could not write .*b.ckpt"):
        writer.wait()
    with pytest.raises(lm.checkpoint_io.CheckpointWriteError, match="Could not write .*b.ckpt"):
        writer.save_checkpoint({"weights": weights}, tmp_path / "d.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ckpt"]


@MOVED_RUN
def test_resume_takes_the_runs_own_settings_so_only_what_changes_is_said(tmp_path, trained, cli):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained[0], run)  # tiny model, 32-character context, its own corpus: none of it said again
    result = cli.train([f"resume={run}", "trainer.max_steps=12"], tmp_path)
    assert "2 layers x 32 wide" in result.stderr and not (tmp_path / "outputs").exists()
    assert last_checkpoint(run)["global_step"] == 12
    resumed = (run / ".hydra" / "resumed_at_10" / "overrides.yaml").read_text()
    assert "model=tiny" in resumed and "trainer.max_steps=12" in resumed and "trainer.max_steps=10" not in resumed
