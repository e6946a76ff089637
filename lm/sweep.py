"""A sweep (one Hydra multirun) that survives: a signal stops all of it, `resume=<sweep dir>` continues it, and each
job's state (finished, interrupted at step N, failed, not started) can be read off its directory.

A stop is a file, <sweep dir>/stopped.json, so that it reaches every job whichever launcher runs them: in this
process (basic), in worker processes (joblib) or in processes of their own (submitit). Whoever gets the signal
first writes it: the sweep's own process, or a job's, which saves last.ckpt at its current step before. Jobs that
see it do not start, running ones stop at their next step, and the sweep then exits 128 + the signal's number with
the command that continues it (docs/studies.md, "Stopping and continuing a sweep").
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lm.files import write_atomically

STOP_FILE = "stopped.json"
SIGNALS = (signal.SIGINT, signal.SIGTERM)
CONTINUE = "python scripts/train.py -m resume={}"


def stop_signal(sweep_dir: Path | str) -> int:
    """The signal that stopped the sweep (0: none)."""
    try:
        return int(json.loads((Path(sweep_dir) / STOP_FILE).read_text())["signal"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def request_stop(sweep_dir: Path | str, signum: int) -> None:
    """Stops the sweep: no job starts from now on, and running ones stop at their next step. The first signal is
    the one kept."""
    path = Path(sweep_dir) / STOP_FILE
    if not stop_signal(sweep_dir) and path.parent.is_dir():
        record = {"signal": int(signum), "name": signal.Signals(signum).name}
        write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record)))


def clear_stop(sweep_dir: Path | str) -> None:
    """A sweep being continued starts without its earlier stop."""
    (Path(sweep_dir) / STOP_FILE).unlink(missing_ok=True)


class _StopSweep:
    """The sweep's own handler of SIGINT and SIGTERM: the first stops the sweep, a second ends its process at once
    (the way a run's own second Ctrl-C does; jobs in other processes still stop at their next step)."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir, self.received = sweep_dir, 0

    def __call__(self, signum, frame) -> None:
        if self.received:
            print(f"\n{signal.Signals(signum).name} received again: stopped at once.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum
        request_stop(self.sweep_dir, signum)
        print(
            f"\n[transformer-lm] {signal.Signals(signum).name} received: the sweep stops; running jobs save "
            "last.ckpt at their current step, and no other job starts.",
            file=sys.stderr,
            flush=True,
        )


class SweepSignals:
    """The sweep's process takes SIGINT and SIGTERM on a thread of its own (`sigwait`), with the signals blocked
    everywhere else. The block is inherited by the processes it starts, so a launcher's helpers (submitit's local
    controller, which would kill its job a second after passing a Ctrl-C on; joblib's idle workers) are not
    stopped by a Ctrl-C meant for the sweep; each job unblocks them when it starts (`listen_for_stop`)."""

    def __init__(self, sweep_dir: Path):
        self.handler = _StopSweep(sweep_dir)
        self.closing = False
        self.previous_handlers: dict[int, object] = {}
        self.previous_mask: set | None = None
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
            return
        # also the Python handler, for a signal a thread started earlier (with them unblocked) takes
        self.previous_handlers = {signum: signal.signal(signum, self.handler) for signum in SIGNALS}
        self.previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        self.thread = threading.Thread(target=self._wait, name="sweep-signals", daemon=True)
        self.thread.start()

    def _wait(self) -> None:
        while True:
            signum = signal.sigwait(SIGNALS)
            if self.closing:
                return
            self.handler(signum, None)

    def stop(self) -> None:
        if self.thread is None:
            return
        self.closing = True
        signal.pthread_kill(self.thread.ident, signal.SIGTERM)  # wakes the thread's sigwait, which returns
        self.thread.join(timeout=5)
        signal.pthread_sigmask(signal.SIG_SETMASK, self.previous_mask)
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.thread = None


class _StopJob:
    """A job's handler of SIGINT and SIGTERM in a process of its own (joblib, submitit) while it is not training
    (lm.callbacks.SaveOnInterrupt handles them then): the job stops at its first step, and a second signal ends the
    process at once. A signal to one job's process stops that job alone; the sweep goes on."""

    def __init__(self) -> None:
        self.received = 0

    def __call__(self, signum, frame) -> None:
        if self.received:
            print(f"\n{signal.Signals(signum).name} received again: stopped at once.", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.received = signum


_SWEEP_PROCESS = False  # whether this process is the sweep's own (where SweepSignals takes the signals)
_JOB_HANDLER = _StopJob()


def in_sweep_process() -> bool:
    """Whether this process is the sweep's own (the basic launcher runs the jobs in it): a signal here is the
    sweep's."""
    return _SWEEP_PROCESS


def listen_for_stop() -> None:
    """At the start of each job: in a process of the job's own, SIGINT and SIGTERM are unblocked (see
    `SweepSignals`) and stop this job; in the sweep's own process (the basic launcher) they stay the sweep's."""
    _JOB_HANDLER.received = 0
    if _SWEEP_PROCESS or threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _JOB_HANDLER)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)


class StopWithSweep(L.Callback):
    """Stops a sweep's job at the end of its current step, saving last.ckpt, once the sweep was stopped (the stop
    file) or this job's process got a signal while it was not training: it hands the stop to
    `lm.callbacks.SaveOnInterrupt` as if the signal had come during training."""

    def __init__(self, sweep_dir: Path):
        self.sweep_dir = sweep_dir

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx) -> None:
        from lm.callbacks import SaveOnInterrupt

        if signum := _JOB_HANDLER.received or stop_signal(self.sweep_dir):
            for callback in trainer.callbacks:
                if isinstance(callback, SaveOnInterrupt) and not callback.received:
                    callback.received = signum


@dataclass
class JobState:
    """How a sweep's job stands: finished, interrupted (at `step`: its last.ckpt), failed (with its `error`
    line) or not started."""

    state: str
    step: int | None = None
    error: str | None = None
    summary: dict | None = None

    @property
    def resumable(self) -> bool:
        return self.state == "interrupted" and self.step is not None

    def describe(self) -> str:
        if self.state == "interrupted":
            at = f"at step {self.step}" if self.step is not None else "before its first checkpoint"
            how = "" if (self.summary or {}).get("status") == "interrupted" else " (killed, or still running)"
            return f"interrupted {at}{how}"
        if self.state == "failed":
            return f"failed: {self.error}"
        return self.state


def checkpoint_step(path: Path) -> int | None:
    """The step a checkpoint was saved at (its tensors are mapped, not read; nothing in it can run code); None for a
    damaged or foreign file."""
    try:
        return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["global_step"])
    except Exception:
        return None


def job_state(job_dir: Path) -> JobState:
    """A job's state, from its summary.json (written when it finishes, fails or is interrupted) and last.ckpt."""
    try:
        summary = json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    status = summary.get("status")
    if status == "finished":
        return JobState("finished", summary=summary)
    if status == "failed":
        return JobState("failed", error=summary.get("error"), summary=summary)
    last = job_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return JobState("interrupted", step=checkpoint_step(last), summary=summary)
    if status == "interrupted" or any(job_dir.glob("events.out.tfevents.*")) or (job_dir / "csv").is_dir():
        return JobState("interrupted", summary=summary)  # trained, but stopped before any checkpoint
    return JobState("not started")


def has_continuable_state(job_dir: Path) -> bool:
    """Whether a continued sweep keeps this job's directory as it is (finished) or goes on from its last.ckpt."""
    state = job_state(job_dir)
    return state.state == "finished" or state.resumable


def config_subdir(*, _root_) -> str | None:
    """hydra.output_subdir of a continued sweep's job (a resolver): where Hydra writes the job's settings. A job
    that finished, or goes on from its checkpoint, keeps the .hydra/ it started with (None: Hydra writes nothing;
    a continued job's settings go to .hydra/resumed_at_<step>/); a new or rerun job gets .hydra/ as usual."""
    return None if has_continuable_state(Path(_root_.hydra.runtime.output_dir)) else ".hydra"


def clear_attempt(job_dir: Path) -> None:
    """Removes what a failed or barely started attempt of a job wrote, before the job runs again from the start;
    its settings (.hydra/) and train.log, which the new attempt appends to, stay."""
    for path in job_dir.iterdir():
        if path.name in (".hydra", "train.log"):
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def sweep_jobs(sweep_dir: Path) -> list[Path]:
    """The job directories of a sweep (those holding .hydra/overrides.yaml), in job order."""
    jobs = [p.parent.parent for p in Path(sweep_dir).glob("*/.hydra/overrides.yaml")]

    def number(job: Path) -> tuple[int, str]:
        head = job.name.split("_", 1)[0]
        return (int(head) if head.isdigit() else 1 << 30, job.name)

    return sorted(jobs, key=number)


def states_line(states: list[str]) -> str:
    """ "2 finished, 1 interrupted, 3 not started": jobs counted by state (`JobState.state`)."""
    order = ("finished", "interrupted", "failed", "not started")
    return ", ".join(f"{states.count(s)} {s}" for s in order if s in states) or "no job started"


def continue_command(sweep_dir: Path) -> str:
    """The command that continues the sweep, with its directory relative to here when it is below."""
    try:
        shown = Path(sweep_dir).resolve().relative_to(Path.cwd())
    except ValueError:
        shown = Path(sweep_dir)
    return CONTINUE.format(shown)


OPTUNA_LOG = "hydra_plugins.hydra_optuna_sweeper._impl"


def quiet_optuna_records(record: logging.LogRecord) -> bool:
    """A filter for the Optuna sweeper's log: a trial that returned no value was stopped or failed, and the job
    said which in its own words, so the sweeper's "Return value must be float-castable. Got 'None'" goes.

    Where the trials run in other processes (joblib, submitit), that line is also the first thing the sweep's own
    process does after a batch that was stopped: the search ends there (`end_stopped_sweep`), where the sweeper
    would go on launching trials that do not start, then name a best trial of a partial search, or fail with "No
    trials are completed yet". The sweeper offers no other hook between a batch and its bookkeeping."""
    if not str(record.msg).startswith("Failed experiment: Return value must be float-castable. Got 'None'"):
        return True
    if _ACTIVE is not None and _ACTIVE.sweep_dir is not None and stop_signal(_ACTIVE.sweep_dir):
        end_stopped_sweep()  # (exits)
    return False


_ACTIVE: StopSweepOnSignal | None = None  # the multirun in progress in this process, if any


def end_stopped_sweep() -> None:
    """In the sweep's own process, once a stop has saved the running job: ends the multirun here, as Hydra would
    end it (every callback's `on_multirun_end`, last first: a study's partial report, then the line that says how
    to continue it). No later job is launched (so none leaves a directory), and a sweeper that would go on
    (Optuna's) neither records the stopped trial as failed nor reports a best trial of a partial search."""
    if _ACTIVE is None:
        return
    config = _ACTIVE.config
    for callback in reversed(list(config.hydra.callbacks.values())):
        if callback._target_ == f"{__name__}.{StopSweepOnSignal.__name__}":
            _ACTIVE.on_multirun_end(config)  # (exits)
        else:
            instantiate(callback).on_multirun_end(config)


class StopSweepOnSignal(Callback):
    """A Hydra callback for every multirun (conf/train.yaml): on SIGINT or SIGTERM the sweep stops (see the
    module's docstring) and, once the launcher has returned (or at once, where the jobs run in the sweep's own
    process: `end_stopped_sweep`), exits 128 + the signal's number with the command that continues it. A continued
    sweep starts without its earlier stop."""

    def __init__(self) -> None:
        self.sweep_dir: Path | None = None
        self.signals: SweepSignals | None = None
        self.config = None  # the multirun's, for `end_stopped_sweep`

    def __getstate__(self) -> dict:
        # launchers send Hydra's callbacks to the jobs' processes (joblib, submitit): the signal thread stays here
        return {**self.__dict__, "signals": None}

    def on_multirun_start(self, config, **kwargs) -> None:
        global _SWEEP_PROCESS, _ACTIVE
        _ACTIVE, self.config = self, config
        logging.getLogger(OPTUNA_LOG).addFilter(quiet_optuna_records)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):
            import optuna  # its study line repeats the sweeper's "Study name" (optuna sets its own log level)

            optuna.logging.set_verbosity(logging.WARNING)
        self.sweep_dir = Path(str(config.hydra.sweep.dir))
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        if not (self.sweep_dir / "multirun.yaml").is_file():
            # what resume=<sweep dir> reads: Hydra's basic sweeper writes it (the same) too, the Optuna one does not
            OmegaConf.save(config, self.sweep_dir / "multirun.yaml")
        clear_stop(self.sweep_dir)
        self.signals = SweepSignals(self.sweep_dir)
        self.signals.start()
        _SWEEP_PROCESS = self.signals.thread is not None

    def on_multirun_end(self, config, **kwargs) -> None:
        global _SWEEP_PROCESS, _ACTIVE
        if self.signals is not None:
            self.signals.stop()
            self.signals = None
        _SWEEP_PROCESS, _ACTIVE = False, None
        logging.getLogger(OPTUNA_LOG).removeFilter(quiet_optuna_records)
        if self.sweep_dir is None:
            return
        states = states_line([job_state(job).state for job in sweep_jobs(self.sweep_dir)])
        if signum := stop_signal(self.sweep_dir):
            print(
                f"[transformer-lm] {signal.Signals(signum).name} stopped the sweep in {self.sweep_dir} ({states}); "
                f"continue it with: {continue_command(self.sweep_dir)}",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(128 + signum)
        if "interrupted" in states or "failed" in states:
            print(
                f"[transformer-lm] the sweep in {self.sweep_dir} ended: {states}; to run what did not finish: "
                f"{continue_command(self.sweep_dir)}",
                file=sys.stderr,
                flush=True,
            )


def sibling_checkpoint(change: str) -> str:
    """The last checkpoint of the job of this sweep whose overrides are this job's with `change` (`key=value`)
    instead: `init_from: ${lm_sweep_job:length_arm=rope}` fine-tunes the rope arm's model of the same seed. The
    sweep must run that job first (its params list it earlier); a ConfigError says so when it has not."""
    from hydra.core.hydra_config import HydraConfig

    from lm.errors import ConfigError

    hydra = HydraConfig.get()
    key = change.split("=", 1)[0]
    ignored = ("resume", "hydra.", "paths.")  # a continued sweep adds resume=; neither names the configuration
    wanted = {o for o in hydra.overrides.task if not o.split("=", 1)[0].lstrip("+~").startswith(ignored)}
    wanted = {o for o in wanted if o.split("=", 1)[0] != key} | {change}
    for job in sweep_jobs(Path(hydra.sweep.dir)):
        overrides = job / ".hydra" / "overrides.yaml"
        if not overrides.is_file():
            continue
        theirs = OmegaConf.to_container(OmegaConf.load(overrides))
        if {o for o in theirs if not o.split("=", 1)[0].lstrip("+~").startswith(ignored)} == wanted:
            checkpoint = job / "checkpoints" / "last.ckpt"
            if checkpoint.is_file():
                return str(checkpoint)
    raise ConfigError(
        f"this job starts from the model of the job with {change} in its sweep, which has no checkpoints/last.ckpt; "
        f"run that job first (list {change.split('=', 1)[1]} earlier in the sweep's {key} values)."
    )
