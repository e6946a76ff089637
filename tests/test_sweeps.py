"""Sweeps that survive: a signal stops the whole sweep, resume=<sweep dir> continues it, runs never share a
directory, and a run on several nodes writes one directory."""

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import hydra.core.utils
import pytest
import torch
import yaml
from helpers import FAST, ROOT, csv_column, last_checkpoint, run_script

from lm.sweep import job_state

# tiny jobs whose CSV log gets a row per step on disk: what the tests wait for
SWEEP = [
    *FAST,
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.val_check_interval=50",
]


def start_sweep(tmp_path: Path, corpus: Path, args: list[str], log) -> subprocess.Popen:
    """`python scripts/train.py -m <args>` in a process group of its own (a terminal's Ctrl-C goes to a group)."""
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "train.py"),
        "-m",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={tmp_path / 'data'}",
        f"data.path={corpus}",
        *SWEEP,
        *args,
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)


def steps_logged(job: Path) -> int:
    """Training steps the job's CSV log holds so far."""
    log = job / "csv" / "metrics.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


def wait_for(condition, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None and not condition():
        time.sleep(0.05)
    assert process.poll() is None, "the sweep ended before it was interrupted"
    assert condition(), "the sweep did not get there in time"


def the_sweep(tmp_path: Path) -> Path:
    sweeps = list((tmp_path / "outputs" / "multirun").iterdir())
    assert len(sweeps) == 1, sweeps
    return sweeps[0]


def _train_rows(run: Path) -> list[str]:
    """The step of each row of the run's CSV log that holds a training loss."""
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    step, loss = header.index("step"), header.index("train/loss")
    return [row.split(",")[step] for row in lines[1:] if row.split(",")[loss]]


def interrupt(process: subprocess.Popen, signum: int) -> int:
    try:
        os.killpg(process.pid, signum)
        return process.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)


def test_ctrl_c_stops_a_sweep_and_resume_finishes_it_training_nothing_twice(tmp_path, corpus):
    # job 0 finishes, Ctrl-C comes during job 1, job 2 never starts
    log_path = tmp_path / "sweep.txt"
    with open(log_path, "w") as log:
        process = start_sweep(tmp_path, corpus, ["trainer.max_steps=20,300,20"], log)
        wait_for(lambda: any(steps_logged(j) >= 5 for j in (tmp_path / "outputs").glob("multirun/*/1_*")), process)
        code = interrupt(process, signal.SIGINT)
    output = log_path.read_text()
    sweep = the_sweep(tmp_path)
    assert code == 130, output[-3000:]
    assert "Traceback" not in output
    assert f"continue it with: python scripts/train.py -m resume={sweep}" in output
    # the sweep ended where it was stopped: the job that never started left no directory
    finished, interrupted = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert job_state(finished).state == "finished"
    stopped = job_state(interrupted)
    assert stopped.state == "interrupted" and stopped.step >= 5, stopped
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "interrupted"
    assert "(1 finished, 1 interrupted)" in output
    # compare.py lists each job's state
    compared = run_script("compare.py", str(sweep), in_process=True)
    assert f"`{interrupted.name}`: interrupted at step {stopped.step}" in compared.stdout
    interrupted_at = torch.load(interrupted / "checkpoints" / "last.ckpt", weights_only=False)["fit_seconds"]

    kept = {p.name: p.read_bytes() for p in [finished / "summary.json", finished / "checkpoints" / "last.ckpt"]}
    before = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
    continued = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", f"resume={sweep}"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert continued.returncode == 0, continued.stderr[-3000:]
    (unstarted,) = set(p for p in sweep.iterdir() if p.is_dir()) - {finished, interrupted}
    assert unstarted.name.startswith("2_")
    # the finished job: not one file touched
    assert {p.name: p.read_bytes() for p in [finished / "summary.json", finished / "checkpoints" / "last.ckpt"]} == kept
    assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == before
    assert f"{finished.name}: finished earlier" in continued.stderr
    # the interrupted job went on from its step, in its directory, with the settings it started with
    assert f"from step {stopped.step}" in continued.stderr
    assert (interrupted / ".hydra" / f"resumed_at_{stopped.step}").is_dir()
    assert "resume" not in (interrupted / ".hydra" / "overrides.yaml").read_text()
    assert last_checkpoint(interrupted)["global_step"] == 300
    logged = [int(s) for s in csv_column(interrupted, "step") if s]  # every row: train and val
    train_steps = sorted(int(r) for r in _train_rows(interrupted))
    assert len(train_steps) == len(set(train_steps)), "no step trained twice"
    # every step but the one the signal came at (its row is logged after the point where the run stops)
    assert set(range(1, 301)) - set(train_steps) <= {stopped.step}
    assert max(logged) == 300
    assert all(job_state(j).state == "finished" for j in (finished, interrupted, unstarted))
    assert not (sweep / "stopped.json").exists()
    # the continued job's training time counts both sessions
    assert json.loads((interrupted / "summary.json").read_text())["fit_seconds"] > interrupted_at > 0


@pytest.mark.parametrize("launcher", ["joblib", "submitit_local"])
def test_ctrl_c_stops_every_job_of_a_parallel_sweep(tmp_path, corpus, launcher):
    pytest.importorskip(f"hydra_plugins.hydra_{launcher.split('_')[0]}_launcher")
    # (3000 steps: long enough to be interrupted, short enough that a failed test leaves no worker training for
    # long); joblib: two jobs at once, the third waits; submitit_local: all three at once, each under a controller
    # process that would kill its job a second after passing a Ctrl-C on
    parallel = ["hydra.launcher.n_jobs=2"] if launcher == "joblib" else ["hydra.launcher.cpus_per_task=1"]
    log_path = tmp_path / "sweep.txt"
    with open(log_path, "w") as log:
        process = start_sweep(
            tmp_path, corpus, [f"hydra/launcher={launcher}", *parallel, "trainer.max_steps=3000", "seed=1,2,3"], log
        )
        jobs = lambda: list((tmp_path / "outputs").glob("multirun/*/*_seed-*"))  # noqa: E731
        wait_for(lambda: sum(steps_logged(j) >= 3 for j in jobs()) >= 2, process)
        code = interrupt(process, signal.SIGINT)
    output = log_path.read_text()
    assert code == 130, output[-3000:]
    assert "Traceback" not in output and "received again" not in output
    states = [job_state(j) for j in sorted(jobs())]
    assert [s.state for s in states].count("interrupted") >= 2, states
    assert all(s.state == "interrupted" for s in states), states  # a job that never started leaves no directory
    for job, state in zip(sorted(jobs()), states, strict=True):
        if state.state == "interrupted":  # saved where it stopped
            assert last_checkpoint(job)["global_step"] == state.step
    assert sum(s.step >= 3 for s in states if s.step is not None) >= 2, "the two running jobs went on from there"


def test_ctrl_c_ends_an_optuna_search_whose_trials_run_in_parallel(tmp_path, corpus):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    # two trials at a time in joblib's workers: the sweeper would go on launching trials that do not start, then
    # name a best trial or fail with "No trials are completed yet"; the search ends after the stopped batch instead
    args = ["hparams_search=optuna_lr", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"]
    args += ["hydra.sweeper.n_trials=6", "trainer.max_steps=3000"]
    log_path = tmp_path / "sweep.txt"
    with open(log_path, "w") as log:
        process = start_sweep(tmp_path, corpus, args, log)
        jobs = lambda: list((tmp_path / "outputs").glob("multirun/optuna_lr/*/*_optimizer.lr-*"))  # noqa: E731
        wait_for(lambda: sum(steps_logged(j) >= 3 for j in jobs()) >= 2, process)
        code = interrupt(process, signal.SIGINT)
    output = log_path.read_text()
    assert code == 130, output[-3000:]
    for noise in ("Traceback", "Failed experiment", "Best parameters", "No trials are completed"):
        assert noise not in output, output[-3000:]
    assert "continue it with: python scripts/train.py -m resume=" in output
    assert [job_state(j).state for j in jobs()] == ["interrupted", "interrupted"]


def test_a_job_that_fails_on_its_own_does_not_stop_the_sweep(tmp_path, corpus, cli):
    # n_head=3 does not divide n_embd=32: that job fails; the other still runs, and the sweep exits 0
    result = cli.train(["-m", f"data.path={corpus}", *FAST, "trainer.max_steps=4", "model.n_head=2,3"], tmp_path)
    sweep = the_sweep(tmp_path)
    states = [job_state(j).state for j in sorted(p for p in sweep.iterdir() if p.is_dir())]
    assert states == ["finished", "failed"]
    assert result.returncode == 0
    assert "1 finished, 1 failed; to run what did not finish: python scripts/train.py -m resume=" in result.stderr


class FrozenClock(datetime):
    """Hydra's `now` at one fixed second: two launches "in the same second"."""

    @classmethod
    def now(cls, tz=None):
        return cls(2026, 12, 3, 12, 0, 0)


def test_two_launches_in_the_same_second_get_two_directories(tmp_path, corpus, cli, monkeypatch):
    monkeypatch.setattr(hydra.core.utils, "datetime", FrozenClock)
    args = [f"data.path={corpus}", *FAST, "trainer.max_steps=2"]
    cli.train(args, tmp_path)
    cli.train(args, tmp_path)
    runs = sorted((tmp_path / "outputs" / "runs").iterdir())
    assert [r.name.split("_", 2)[:2] for r in runs] == [["2026-12-03", "12-00-00"]] * 2
    assert runs[1].name == runs[0].name + ".2"
    for run in runs:  # each its own checkpoints, summary and one log
        assert json.loads((run / "summary.json").read_text())["global_step"] == 2
        assert len(list(run.glob("csv/metrics.csv"))) == 1
    # sweeps too
    cli.train(["-m", *args, "seed=1,2"], tmp_path)
    cli.train(["-m", *args, "seed=1,2"], tmp_path)
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    assert [s.name for s in sweeps] == ["2026-12-03_12-00-00", "2026-12-03_12-00-00.2"]
    assert all(len(list(s.glob("*/summary.json"))) == 2 for s in sweeps)


def test_a_directory_that_holds_a_run_is_reused_only_by_resume(tmp_path, corpus, cli):
    run = tmp_path / "my_run"
    args = [f"data.path={corpus}", *FAST, "trainer.max_steps=2"]
    cli.train([*args, f"hydra.run.dir={run}"], tmp_path)
    kept = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = cli.train([*args, f"hydra.run.dir={run}"], tmp_path, check=False)
    assert again.returncode == 1
    assert f"hydra.run.dir={run} holds a run already" in again.stderr and f"resume={run}" in again.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == kept
    sweep = tmp_path / "my_sweep"
    cli.train(["-m", *args, "seed=1", f"hydra.sweep.dir={sweep}"], tmp_path)
    again = cli.train(["-m", *args, "seed=1", f"hydra.sweep.dir={sweep}"], tmp_path, check=False)
    assert again.returncode == 1 and "holds a sweep already" in again.stderr


@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_nodes_write_one_run_directory_through_validations_and_a_resume(tmp_path, corpus):
    # two "nodes" on 127.0.0.1, one process each, as torchrun starts them on a cluster: before, node 1 named a
    # directory of its own a second later and left it behind
    outputs, scratch = tmp_path / "outputs", tmp_path / "tmp"
    scratch.mkdir()
    common = [
        f"paths.output_dir={outputs}",
        f"data.path={corpus}",
        *FAST,
        "trainer.accelerator=cpu",
        "trainer.strategy=ddp",
        "trainer.devices=1",
        "trainer.num_nodes=2",
        "trainer.val_check_interval=10",
    ]

    def two_nodes(args: list[str], port: int) -> list[str]:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "TMPDIR": str(scratch)}
        nodes = [
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"),
                    *("--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)),
                    str(ROOT / "scripts" / "train.py"),
                    *common,
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env=env,
            )
            for n in (0, 1)
        ]
        outputs_ = [node.communicate(timeout=300)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs_)
        return outputs_

    port = 29400 + os.getpid() % 500
    two_nodes(["trainer.max_steps=30"], port)
    runs = list((outputs / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert len(csv_column(run, "val/loss")) == 3, "three validations"
    assert not list(scratch.glob("transformer-lm-*")), "node 1's private directory is removed"
    node0, _ = two_nodes(["trainer.max_steps=50", f"resume={run}"], port + 1)
    assert "from step 30" in node0
    assert list((outputs / "runs").iterdir()) == [run]
    assert last_checkpoint(run)["global_step"] == 50
    assert len(csv_column(run, "val/loss")) == 5
    assert not list(scratch.glob("transformer-lm-*"))
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())  # rank 0's, as it started


def test_an_optuna_search_continues_with_the_same_trials(tmp_path, corpus, cli):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    args = [
        f"data.path={corpus}",
        "hparams_search=optuna_lr",
        *FAST,
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "hydra.sweeper.n_trials=3",
    ]
    cli.train(args, tmp_path)
    sweep = next((tmp_path / "outputs" / "multirun" / "optuna_lr").iterdir())
    first, failed, unstarted = jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    # as a stopped search leaves them: one failed, one that never trained (only its settings)
    (failed / "summary.json").write_text(json.dumps({"status": "failed", "error": "The training loss became nan"}))
    for path in unstarted.iterdir():
        if path.name != ".hydra":
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    kept = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    result = cli.train(["-m", f"resume={sweep}"], tmp_path)
    assert f"{first.name}: finished earlier" in result.stderr
    # the seeded sampler, given the first trial's stored result, proposes the same trials: the same directories
    assert sorted(p for p in sweep.iterdir() if p.is_dir()) == jobs
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*")} == kept
    assert [job_state(j).state for j in jobs] == ["finished"] * 3


@pytest.mark.parametrize("search", [["seed=1"], ["hparams_search=optuna_lr", "hydra.sweeper.n_trials=1"]])
def test_a_continued_job_counts_every_sessions_training_time_and_no_pause(tmp_path, corpus, cli, monkeypatch, search):
    if "hparams_search=optuna_lr" in search:
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import lm.sweep
    from lm.report import load_sweep

    # the sweep is stopped as by a Ctrl-C during step 7: its job reads the stop at each step's start
    calls = []
    monkeypatch.setattr(lm.sweep, "stop_signal", lambda sweep_dir: calls.append(1) or 2 * (len(calls) > 6))
    args = [f"data.path={corpus}", *FAST, "trainer.val_check_interval=3", "logger=tensorboard", "trainer.max_steps=9"]
    report = "++hydra.callbacks.write_report._target_=lm.commands.WriteReport"  # as a study has
    stopped_run = cli.train(["-m", *args, *search, report], tmp_path, check=False)
    monkeypatch.undo()
    assert stopped_run.returncode == 130, stopped_run.stderr[-2000:]
    output = stopped_run.stdout + stopped_run.stderr
    # the search ends where it was stopped: no trial recorded as failed, no best trial of a partial search
    assert "Failed experiment" not in output and "Best parameters" not in output and "Traceback" not in output
    assert "continue it with: python scripts/train.py -m resume=" in output
    assert "interrupted" in (next((tmp_path / "outputs" / "multirun").rglob("results.md"))).read_text()
    sweep = next(p.parent for p in (tmp_path / "outputs" / "multirun").rglob("multirun.yaml"))
    (job,) = [p for p in sweep.iterdir() if p.is_dir()]
    stopped = json.loads((job / "summary.json").read_text())
    assert stopped["status"] == "interrupted" and [v["step"] for v in stopped["validations"]] == [3, 6]
    saved = torch.load(job / "checkpoints" / "last.ckpt", weights_only=False)["fit_seconds"]
    assert stopped["validations"][-1]["fit_seconds"] < saved <= stopped["fit_seconds"]

    pause = 1000.0  # seconds between the two sessions, as the event files' wall clock sees them
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + pause)
    cli.train(["-m", f"resume={sweep}"], tmp_path)
    monkeypatch.undo()
    summary = json.loads((job / "summary.json").read_text())
    assert summary["global_step"] == 9
    assert saved < summary["fit_seconds"] < pause
    # the first session's validations, with their times, and the second's after them on the same clock
    assert [v["step"] for v in summary["validations"]] == [3, 6, 9]
    assert summary["validations"][0] == stopped["validations"][0]
    clock = [v["fit_seconds"] for v in summary["validations"]]
    assert clock == sorted(clock) and clock[-1] <= summary["fit_seconds"]
    # the report: the wall-time column and the loss-against-time curve count both sessions and not the pause
    (record,) = load_sweep(sweep)
    assert record.curves["val/loss"].steps == [3, 6, 9]
    assert record.curves["val/loss"].seconds == clock
    cli.script("compare.py", str(sweep))
    (row,) = csv.DictReader((sweep / "results.csv").open())
    assert float(row["wall_s"]) == pytest.approx(summary["fit_seconds"], abs=0.5)
