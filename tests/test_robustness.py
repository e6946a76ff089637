"""Runs that survive: exact resume, signals, divergence, bad input, reproducibility, two-process DDP."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import FAST, ROOT, TINY, csv_column, last_checkpoint, only_run, run_script, run_train, scalars


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon + AdamW is one optimizer: steps count once
def test_resume_is_exact_and_seeds_repeat(tmp_path, corpus, optimizer, cli):
    common = [
        f"data.path={corpus}",
        *FAST,
        f"optimizer={optimizer}",
        "model.dropout=0.1",
        "trainer.log_every_n_steps=1",
        "lr_schedule.warmup_steps=5",
        "lr_schedule.total_steps=20",
    ]
    straight, again, split = tmp_path / "straight", tmp_path / "again", tmp_path / "split"
    cli.train([*common, "trainer.max_steps=20"], straight)
    if optimizer == "adamw":  # seed repeatability does not depend on the optimizer: checked once
        cli.train([*common, "trainer.max_steps=20"], again)
    cli.train([*common, "trainer.max_steps=10"], split)
    first_half = only_run(split / "outputs")
    resumed = run_train([*common, "trainer.max_steps=20", f"resume={first_half}"], split, python_warnings=None)
    # mid-epoch (21 batches an epoch): the bar goes on from 10 of the 20 steps, and Lightning's caution that the
    # data may not resume is not printed (batch i is a function of the step)
    assert "| 10/20 [" in resumed.stdout and "| 20/20 [" in resumed.stdout
    assert "resuming from a checkpoint that ended before the epoch ended" not in resumed.stderr

    a, c = only_run(straight / "outputs"), only_run(split / "outputs")
    assert c == first_half, "resume= continues in the same run directory"
    if optimizer == "adamw":
        assert csv_column(a, "train/loss") == csv_column(only_run(again / "outputs"), "train/loss"), "same seed"
    ckpt_a, ckpt_c = last_checkpoint(a), last_checkpoint(c)
    assert ckpt_a["global_step"] == ckpt_c["global_step"] == 20
    # last.ckpt is written after ModelCheckpoint has seen the same validation (the only one here): its best score
    best_score = next(v for k, v in ckpt_a["callbacks"].items() if k.startswith("ModelCheckpoint"))["best_model_score"]
    assert best_score is not None and float(best_score) == pytest.approx(csv_column(a, "val/loss")[-1], abs=1e-6)
    for key, value in ckpt_a["state_dict"].items():
        assert torch.allclose(value, ckpt_c["state_dict"][key], atol=1e-6), key
    assert csv_column(a, "val/loss")[-1] == pytest.approx(csv_column(c, "val/loss")[-1], abs=1e-6)
    assert csv_column(a, "train/loss")[-10:] == pytest.approx(csv_column(c, "train/loss")[-10:], abs=1e-6)


def test_last_checkpoint_is_the_latest_step_even_when_val_loss_stops_improving(tmp_path, corpus, cli):
    # lr=0: the model never changes, so no validation after the first improves on it (Lightning >= 2.6 then writes
    # its save_last copy only with a new best); resume= must still continue from the last step, not the best one
    common = [f"data.path={corpus}", *FAST, "optimizer.lr=0", "trainer.val_check_interval=2"]
    cli.train([*common, "trainer.max_steps=6"], tmp_path)
    run = only_run(tmp_path / "outputs")
    assert csv_column(run, "val/loss") == [csv_column(run, "val/loss")[0]] * 3
    assert last_checkpoint(run)["global_step"] == 6
    best = run / "checkpoints" / "best.ckpt"
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 2, "the first of equal losses"
    # resumed, the best score comes back with last.ckpt: equal losses still leave best.ckpt alone
    cli.train([*common, "trainer.max_steps=10", f"resume={run}"], tmp_path)
    assert last_checkpoint(run)["global_step"] == 10
    assert torch.load(best, map_location="cpu", weights_only=True)["global_step"] == 2


def start_and_wait_for_steps(overrides: list[str], outputs: Path, out, steps: int, **popen) -> subprocess.Popen:
    """Starts `scripts/train.py` with `overrides` (its output to the file `out`) and returns once `steps` training
    steps are logged (or it ended, or two minutes passed)."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        f"paths.output_dir={outputs}",
        f"paths.data_dir={outputs.parent / 'data'}",
        *overrides,
        "trainer.log_every_n_steps=1",
        "+logger.csv.flush_logs_every_n_steps=1",  # a row per step on disk: what this waits for
    ]
    process = subprocess.Popen(cmd, stdout=out, stderr=out, env={**os.environ, "PYTHONWARNINGS": "ignore"}, **popen)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        logs = list(outputs.glob("runs/*/csv/metrics.csv"))
        if logs and len(logs[0].read_text().splitlines()) > steps:
            break
        time.sleep(0.02)
    return process


def interrupt_after_steps(overrides: list[str], outputs: Path, log: Path, steps: int, signum: int) -> int:
    """Sends `signum` to a run once `steps` training steps are logged, and returns its exit status (its output goes
    to `log`)."""
    with open(log, "w") as out:
        process = start_and_wait_for_steps(overrides, outputs, out, steps)
        process.send_signal(signum)
        return process.wait(timeout=120)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_resume_continues(tmp_path, corpus, signum, cli):
    outputs, log = tmp_path / "outputs", tmp_path / "output.txt"
    code = interrupt_after_steps([f"data.path={corpus}", *FAST, "trainer.max_steps=100000"], outputs, log, 3, signum)
    message = log.read_text()
    assert code == 128 + signum, message[-2000:]
    assert f"{signal.Signals(signum).name} received" in message and "Traceback" not in message
    run = only_run(outputs)
    step = last_checkpoint(run)["global_step"]
    assert step >= 3
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    cli.train([f"data.path={corpus}", *FAST, f"trainer.max_steps={step + 5}", f"resume={run}"], tmp_path)
    assert last_checkpoint(run)["global_step"] == step + 5


def live_processes(group: int) -> list[str]:
    """The processes of a process group still running (zombies, which have exited, left out)."""
    ps = subprocess.run(["ps", "-o", "pid=,stat=", "-g", str(group)], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split()[1:2] != ["Z"]]


@pytest.mark.parametrize(
    ("signum", "to"), [(signal.SIGINT, "group"), (signal.SIGTERM, "each"), (signal.SIGINT, "rank 1")]
)
def test_a_signal_stops_every_ddp_process_at_one_step_and_leaves_none_behind(tmp_path, corpus, signum, to):
    # "group": a terminal's Ctrl-C; "each": SLURM or torchrun signalling every task; "rank 1": one process only
    outputs, log = tmp_path / "outputs", tmp_path / "output.txt"
    overrides = [
        f"data.path={corpus}",
        *FAST,
        "trainer=ddp",
        "trainer.max_steps=100000",
        "trainer.val_check_interval=5",
    ]
    with open(log, "w") as out:
        process = start_and_wait_for_steps(overrides, outputs, out, 12, start_new_session=True)
        try:
            ranks = [int(line.split()[0]) for line in live_processes(process.pid)]
            assert len(ranks) == 2, log.read_text()[-2000:]
            if to == "group":
                os.killpg(process.pid, signum)
            else:
                for pid in ranks if to == "each" else [r for r in ranks if r != process.pid]:
                    os.kill(pid, signum)
            sent = time.monotonic()
            code = process.wait(timeout=60)
            stopped_in = time.monotonic() - sent
            deadline = time.monotonic() + 10
            while live_processes(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not live_processes(process.pid), "a rank outlived the run"
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
    message = log.read_text()
    assert code == 128 + signum, message[-3000:]
    assert stopped_in < 20
    assert message.count(f"{signal.Signals(signum).name} received") == 1 and "Traceback" not in message
    run = only_run(outputs)
    step = int(re.search(r"at step (\d+)", message).group(1))
    assert last_checkpoint(run)["global_step"] == step
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_second_signal_ends_the_process_at_once_even_inside_a_blocking_call(tmp_path):
    # The first signal asks for a stop at the end of the step; a process blocked in C code (a collective waiting on
    # a dead peer, here a lock never released) never gets there, and the second must end it.
    script = """
import os, signal, threading, time
from lm.callbacks import SaveOnInterrupt
SaveOnInterrupt().on_train_start(None, None)
threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()
threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
lock = threading.Lock()
lock.acquire()
lock.acquire()  # blocks for ever: Python's handler runs but returns, the wait goes on
"""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 130, result.stderr
    assert "SIGINT received again" in result.stderr
    assert time.monotonic() - started < 30


def test_a_resumed_time_budget_run_spends_only_what_is_left_and_its_schedule_goes_on(tmp_path, corpus, cli):
    budget = 8.0
    overrides = [
        f"data.path={corpus}",
        *FAST,
        "trainer.max_time=00:00:00:08",
        "lr_schedule.warmup_steps=3",
        "optimizer.lr=1e-3",
    ]
    outputs, log = tmp_path / "outputs", tmp_path / "output.txt"
    # past warmup, well before the end even where steps are slow (0.3 s each on a loaded 2-core machine)
    code = interrupt_after_steps(overrides, outputs, log, 8, signal.SIGINT)
    assert code == 128 + signal.SIGINT, log.read_text()[-2000:]
    run = only_run(outputs)
    stopped = last_checkpoint(run)
    spent = stopped["callbacks"]["Timer"]["time_elapsed"]["train"]
    assert 0 < spent < budget - 1, "interrupted early enough to leave a budget to resume"
    lrs_before = csv_column(run, "train/lr")

    resumed_run = cli.train([*overrides, f"resume={run}"], tmp_path)
    left, trained = f"00:00:00:{round(budget - spent):02d}", f"00:00:00:{round(spent):02d}"
    assert f"a time budget of 00:00:00:08, {left} of it left after the {trained} already trained" in resumed_run.stderr
    finished = last_checkpoint(run)
    assert finished["global_step"] > stopped["global_step"]
    # the budget is for the run, not for each process: the resumed part trains for what was left
    assert finished["callbacks"]["Timer"]["time_elapsed"]["train"] == pytest.approx(budget, abs=1.0)
    assert finished["lr_schedule"]["warmup_end_s"] == stopped["lr_schedule"]["warmup_end_s"]
    lrs = csv_column(run, "train/lr")  # the same CSV log, continued
    resumed = lrs[len(lrs_before) :]
    assert resumed, "the resumed part logged its learning rates"
    # no second warmup: the cosine picks up below where it stopped and ends at min_lr_ratio * lr with the budget
    assert resumed[0] <= lrs_before[-1] + 1e-12 and resumed[0] > 1.1e-4
    assert all(b <= a + 1e-12 for a, b in zip(resumed, resumed[1:], strict=False))
    assert resumed[-1] < 1.2e-4


def test_divergence_stops_at_once_and_keeps_the_last_good_checkpoint(tmp_path, corpus, cli):
    result = cli.train(
        [
            f"data.path={corpus}",
            *FAST,
            "optimizer.lr=1e6",
            "trainer.gradient_clip_val=null",
            "trainer.val_check_interval=1",
            "trainer.max_steps=50",
        ],
        tmp_path,
        check=False,
    )
    assert result.returncode == 1
    match = re.search(r"loss became (nan|inf|-inf) (at|after) step (\d+)", result.stderr)
    assert match, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    # the error is the last thing the run prints: the progress bar's last redraw does not bury it
    assert result.stderr.rstrip().splitlines()[-1].startswith("error: The ")
    checkpoint = last_checkpoint(only_run(tmp_path / "outputs"))
    assert 0 < checkpoint["global_step"] < int(match.group(3))  # the last checkpoint before the divergence
    log = (only_run(tmp_path / "outputs") / "train.log").read_text()  # the error is in the run's log too
    assert log.rstrip().splitlines()[-1].startswith("error: The ")
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_on_a_gpu_divergence_is_read_at_logging_steps_and_names_the_first_bad_step():
    from types import SimpleNamespace

    from lm.errors import TrainingDivergedError
    from lm.model import TransformerConfig
    from lm.module import LanguageModel

    module = LanguageModel(TransformerConfig(vocab_size=5, n_layer=1, n_head=1, n_embd=8), "abcde", torch.optim.SGD)
    logging = SimpleNamespace(should_update_logs=False)
    module._trainer = SimpleNamespace(global_step=0, _logger_connector=logging)
    module.read_divergence_every_step = False  # as on_fit_start sets it on CUDA: no host-device sync every step
    for step, loss in enumerate([1.0, float("nan"), float("inf"), 2.0]):
        module._trainer.global_step = step
        module.watch_for_divergence(torch.tensor(loss))  # not read: no logging step yet
    logging.should_update_logs = True
    with pytest.raises(TrainingDivergedError, match="The training loss became nan at step 2;"):
        module.watch_for_divergence(torch.tensor(3.0))


def test_gradient_norm_is_logged(tmp_path, corpus, cli):
    cli.train([f"data.path={corpus}", *TINY, "trainer.max_steps=4", "trainer.log_every_n_steps=1"], tmp_path)
    assert len(scalars(only_run(tmp_path / "outputs"))["train/grad_norm"]) == 4


@pytest.mark.parametrize(
    "args,message",
    [
        (["model=huge"], "model"),
        (["trainer.no_such_flag=1"], "no_such_flag"),
        (["data.val_fraction=1.5"], "error: data.val_fraction=1.5 must be between 0 and 1"),
        (["data.seq_length=0"], "error: data.seq_length=0 must be a positive integer."),
        (["data.batch_size=true"], "error: data.batch_size=True must be a positive integer."),
        (["model.n_embd=30", "model.n_head=4"], "divisible"),
        (["model.n_embd=6", "model.n_head=2"], "even head size"),
        (["data.batch_size=-2"], "batch_size"),
        (["optimizer.lr=-1"], "error: The optimizer refused its settings (Invalid learning rate: -1)"),
        (["seed=abc"], "error: seed=abc must be an integer"),
        (["trainer.val_check_interval=0"], "error: trainer.val_check_interval=0 must be a positive number"),
        (["trainer.max_steps=0"], "error: trainer.max_steps=0 must be a positive number of steps, or -1 for no step"),
        (["trainer.max_steps=-5"], "error: trainer.max_steps=-5 must be a positive number of steps"),
        (["trainer.max_time=soon"], "error: trainer: `Timer(duration='soon')` is not a valid duration"),
        (["resume=/nonexistent/run"], "error: resume=/nonexistent/run: there is no such directory; pass the"),
    ],
)
def test_bad_config_exits_non_zero_with_a_clear_message(tmp_path, corpus, args, message, cli):
    result = cli.train([f"data.path={corpus}", "model=tiny", *args], tmp_path, check=False)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    runs = tmp_path / "outputs" / "runs"  # nothing was run, so no run directory (nor an empty runs/) is left behind
    assert not runs.exists(), list(runs.iterdir())
    if message.startswith("error:"):  # ours, also where Hydra's instantiate raised it: the last line, alone
        assert result.stderr.strip().splitlines()[-1].startswith(message)
        assert "Error in call to target" not in result.stderr


def test_bad_resume_path_creates_nothing(tmp_path, corpus, cli):
    target = tmp_path / "not_a_run"
    result = cli.train([f"data.path={corpus}", "model=tiny", f"resume={target}"], tmp_path, check=False)
    assert result.returncode == 1 and "there is no such directory" in result.stderr
    assert not target.exists()
    target.mkdir()  # a directory, but no run's
    result = cli.train([f"data.path={corpus}", "model=tiny", f"resume={target}"], tmp_path, check=False)
    assert result.returncode == 1 and "has no checkpoints/last.ckpt" in result.stderr
    assert list(target.iterdir()) == []


def test_full_traceback_on_request(tmp_path, cli, monkeypatch):
    monkeypatch.setenv("LM_FULL_ERROR", "1")
    env_result = cli.train([f"data.path={tmp_path / 'missing.txt'}"], tmp_path, check=False)
    assert env_result.returncode != 0 and "Traceback" in env_result.stderr and "DataError" in env_result.stderr


@pytest.mark.parametrize("clock", ["steps", "time"])
def test_ddp_two_cpu_processes_last_through_many_validations_and_reduce_them_exactly(tmp_path, corpus, clock):
    # Samples of 100 characters from a 32-character context grow the position tables on rank 0 only: DDP once
    # broadcast them as buffers every step, and the sizes differed (a gloo abort after a few validations).
    length = ["trainer.max_steps=30"] if clock == "steps" else ["trainer.max_time=00:00:00:12"]
    result = run_train(
        [
            f"data.path={corpus}",
            *FAST,
            "trainer=ddp",
            *length,
            "trainer.val_check_interval=5",
            "callbacks.text_sample.max_new_tokens=100",
            # with an average of the weights: the reduced val/loss below must then be the saved average's
            "callbacks.ema_weights.decay=0.9",
            # and short sequences and small batches first: every rank takes the step's shape
            "data.seq_length_start=8",
            "data.seq_length_warmup_steps=10",
            "data.batch_size_start=2",
            "data.batch_size_warmup_steps=10",
        ],
        tmp_path,
        python_warnings=None,
    )
    run = only_run(tmp_path / "outputs")
    assert len(csv_column(run, "val/loss")) >= 5
    assert "sync_dist" not in result.stderr  # the metric is reduced across processes already
    assert result.stderr.count("----- sample after") == 1  # rank 0 alone samples and prints
    log = (run / "train.log").read_text()  # written by rank 0 alone
    assert log.count("[transformer-lm] precision") == 1 and log.count("----- sample after") == 1
    assert len(list((run / "checkpoints").glob("*.ckpt"))) == 2  # best and last, written once by rank 0
    if clock == "time":
        return  # the reduction is the same on either clock: checked once
    logged = csv_column(run, "val/loss")[-1]
    ckpt = run / "checkpoints" / "last.ckpt"
    evaluation = run_script(
        "evaluate.py", f"ckpt={ckpt}", "precision=32", f"output={tmp_path / 'eval'}", in_process=True
    )
    single = float(evaluation.stdout.strip().splitlines()[-1].split("|")[3])
    assert logged == pytest.approx(single, abs=1e-4)
    assert "val/loss=" in result.stderr


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    import lm.checkpoint_io

    writer = lm.checkpoint_io.AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    writer.save_checkpoint({"weights": torch.ones(3)}, path)

    def dies_halfway(obj, file):
        file.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # as if the process were stopped mid-write

    monkeypatch.setattr(lm.checkpoint_io.torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"weights": torch.zeros(3)}, path)
    assert torch.load(path, weights_only=True)["weights"].sum() == 3
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
