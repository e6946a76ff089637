"""<run dir>/train.log: what the console showed of a run (its start line, results, sample, any error), without the
progress bar's redraws, plus one line per validation, whose results the console shows only inside the bar."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path


class _Tee:
    """A text stream that writes to `stream` and appends to the run log what is not a progress-bar redraw."""

    def __init__(self, stream, log: RunLog):
        self._stream, self._log = stream, log
        self._after_bar = False  # the last write was the bar's: a bare newline then is the bar's too

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        if "\r" in text or "\x1b[" in text:  # tqdm redraws its line with a carriage return, nested bars move the cursor
            self._after_bar = True
        elif not (self._after_bar and text.strip() == ""):
            self._log.write(text)
            self._after_bar = False
        return written

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


class RunLog:
    """Appends to <run dir>/train.log once the run has passed its checks (`start`): what comes before is held
    back and written then, so a run refused before it starts (bad input, a resume that cannot go on) leaves its
    directory as it was. The file is never created in a directory that is not there."""

    current: RunLog | None = None

    def __init__(self, path: Path):
        self.path, self._file, self._held, self.started = path, None, [], False

    def start(self) -> None:
        self.started = True
        held, self._held = "".join(self._held), []
        if held:
            self.write(held)

    def write(self, text: str) -> None:
        if not self.started:
            self._held.append(text)
            return
        if self._file is None:
            if not self.path.parent.is_dir():
                return
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._file.write(text)
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def is_rank_zero() -> bool:
    """Whether this process is rank 0 of its run (Lightning and torchrun set these for the others)."""
    return all(os.environ.get(key, "0") == "0" for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def logged_to(run_dir: str | Path) -> Iterator[None]:
    """Within it, rank 0's stdout and stderr also go to <run_dir>/train.log (progress-bar redraws left out)."""
    if not is_rank_zero():
        yield
        return
    log = RunLog(Path(run_dir) / "train.log")
    previous = RunLog.current, sys.stdout, sys.stderr
    RunLog.current = log
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        yield
    finally:
        RunLog.current, sys.stdout, sys.stderr = previous
        log.close()


def start_logging() -> None:
    """The run passed its checks: train.log gets what was held back, and what follows."""
    if RunLog.current is not None:
        RunLog.current.start()


def log_only(line: str) -> None:
    """A line for train.log alone (nothing on the console), when a run is being logged."""
    if RunLog.current is not None:
        RunLog.current.write(line.rstrip("\n") + "\n")
