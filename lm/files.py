"""File helpers: atomic writes, a file's sha256, and a checked download."""

from __future__ import annotations

import hashlib
import os
import secrets
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from lm.errors import DataError


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Calls `write(tmp)` on a temporary file beside `path`, then renames it into place.

    A crash or a concurrent writer never leaves a half-written `path`; the temporary file is removed on error.
    The file gets the permissions any new file in that folder gets (0666 less the umask), not mkstemp's 0600, so
    the other users of a shared data folder can read it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def claim_directory(path: str) -> str:
    """Creates the directory `path` and returns it; if it exists already (another run launched in the same second
    took it), `path.2`, `path.3`, ...: the first one this process creates itself. `mkdir` either creates a directory
    or fails, atomically, so two runs never get the same one."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = base if n == 1 else base.with_name(f"{base.name}.{n}")
        try:
            candidate.mkdir()
            return str(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"{base} and 9,999 numbered copies of it exist already; clear out {base.parent}.")


def download(url: str, dest: Path, sha256: str | None, timeout: float = 60.0, corpus: Path | None = None) -> None:
    """Downloads `url` to `dest` atomically, checking its sha256; a mismatched download leaves nothing behind.
    `corpus`: where the user may put the corpus instead (when `dest` is an archive of it), for the error message."""
    corpus = corpus or dest

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
                while block := response.read(1 << 20):
                    digest.update(block)
                    out.write(block)
        except (urllib.error.URLError, OSError) as error:
            raise DataError(
                f"Could not download {url} ({getattr(error, 'reason', error)}); put the file at {corpus} yourself "
                "or pass data.path=/path/to/corpus.txt."
            ) from error
        if sha256 and digest.hexdigest() != sha256:
            raise DataError(
                f"The download from {url} has sha256 {digest.hexdigest()}, expected {sha256}; it was discarded. "
                f"Put a correct copy at {dest} or pass data.path=/path/to/corpus.txt."
            )

    print(f"Downloading {url} -> {dest}", flush=True)
    write_atomically(dest, fetch)


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
