"""The character corpus on disk: its download, and its one-pass encoding to a memory-mapped id cache.

A corpus of any size is read in chunks, never as one Python string. Its ids are cached next to it (or in a
cache folder when that directory is read-only), keyed by the corpus's sha256, and training memory-maps that
cache.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import os
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm.errors import ConfigError, DataError
from lm.files import download, file_sha256, write_atomically
from lm.tokenizer import CharTokenizer, text_to_codepoints

TINY_SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
CHUNK_BYTES = 16 * 1024 * 1024
CACHE_FORMAT = 2  # 2: the index records the number of ids and their crc32
ENCODINGS = {"utf-8": "utf-8", "bytes": "latin-1"}  # bytes: each byte is one character (latin-1 maps 0-255 to itself)


def download_corpus(
    url: str, dest: Path, sha256: str | None, size: int | None = None, archive_member: str | None = None
) -> None:
    """Downloads a corpus to `dest` once: the file itself, or with `archive_member` a zip holding it, which is
    extracted and then deleted. The corpus's size (bytes) and sha256 are checked; a mismatch leaves nothing behind."""
    if archive_member is None:
        download(url, dest, sha256)
    else:
        archive = dest.parent / f"{dest.name}.zip"
        download(url, archive, None, corpus=dest)  # mirrors re-pack archives: the corpus inside is what is checked
        try:
            write_atomically(dest, lambda tmp: _extract(archive, archive_member, tmp, url))
        finally:
            archive.unlink(missing_ok=True)
        if sha256 and (digest := file_sha256(dest)) != sha256:
            dest.unlink()
            raise DataError(
                f"{archive_member} from {url} has sha256 {digest}, expected {sha256}; it was discarded. "
                f"Put a correct copy at {dest} or pass data.path=/path/to/corpus."
            )
    if size is not None and (actual := dest.stat().st_size) != size:
        dest.unlink()
        raise DataError(
            f"The corpus from {url} has {actual} bytes, expected {size}; it was discarded. "
            f"Put a correct copy at {dest} or pass data.path=/path/to/corpus."
        )


def _extract(archive: Path, member: str, out: Path, url: str) -> None:
    try:
        with zipfile.ZipFile(archive) as zf, zf.open(member) as source, open(out, "wb") as target:
            while block := source.read(1 << 20):
                target.write(block)
    except (zipfile.BadZipFile, KeyError) as error:
        raise DataError(
            f"The download from {url} is not a zip archive holding {member} ({error}); put the corpus at "
            f"{archive.parent / member} yourself or pass data.path=/path/to/corpus."
        ) from None


@dataclass
class EncodedCorpus:
    """A corpus as a memory-mapped array of ids, with the tokenizer that made them."""

    ids: np.ndarray
    tokenizer: CharTokenizer
    sha256: str


NEWLINES = ("normalize", "keep")  # normalize: Windows line ends (\r\n) read as \n; keep: \r stays a character


def _decoded_chunks(
    path: Path, errors: str, encoding: str = "utf-8", newlines: str = "keep"
) -> Iterator[tuple[str, bytes]]:
    """Yields (text, raw bytes) chunk by chunk; invalid UTF-8 under errors='strict' names its byte offset. With
    newlines='normalize', each \r\n becomes \n (a lone \r stays), across chunk boundaries too."""
    decoder = codecs.getincrementaldecoder(ENCODINGS[encoding])(errors=errors)
    offset = 0
    held = ""  # a chunk's last \r, held until the next chunk shows whether a \n follows it
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_BYTES)
            pending = len(decoder.getstate()[0])
            try:
                text = decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as error:
                where = offset - pending + error.start
                raise DataError(
                    f"{path} is not valid UTF-8 (byte offset {where}); fix the file or pass "
                    "data.decode_errors=replace to replace undecodable bytes."
                ) from None
            offset += len(raw)
            if newlines == "normalize":
                text, held = held + text, ""
                if raw and text.endswith("\r"):
                    text, held = text[:-1], "\r"
                text = text.replace("\r\n", "\n")
            yield text, raw
            if not raw:
                return


def _scan_vocabulary(path: Path, errors: str, encoding: str, newlines: str) -> tuple[str, str]:
    """One pass over the file: its sorted unique characters and its sha256."""
    digest = hashlib.sha256()
    seen = np.zeros(65536, dtype=bool)
    beyond_bmp: set[int] = set()
    for text, raw in _decoded_chunks(path, errors, encoding, newlines):
        digest.update(raw)
        codepoints = text_to_codepoints(text)
        # bincount is linear time; a sort-based unique over hundreds of millions of characters is not
        small = codepoints[codepoints < 65536]
        seen |= np.bincount(small, minlength=65536).astype(bool)
        beyond_bmp.update(np.unique(codepoints[codepoints >= 65536]).tolist())
    codepoints = np.flatnonzero(seen).tolist() + sorted(beyond_bmp)
    return "".join(map(chr, codepoints)), digest.hexdigest()


def cache_dir_for(corpus: Path, fallback: Path) -> Path:
    """The corpus's own folder when it is writable, otherwise `fallback` (read-only data stays untouched)."""
    return corpus.parent if os.access(corpus.parent, os.W_OK) else fallback


def encode_corpus(
    path: str | Path,
    cache_dir: str | Path | None = None,
    decode_errors: str = "strict",
    encoding: str = "utf-8",
    newlines: str = "normalize",
) -> EncodedCorpus:
    """Encodes a text file to ids once, caches them, and memory-maps the cache.

    `encoding` is 'utf-8' (characters) or 'bytes' (each byte one symbol, as enwik8 is read in the literature).
    `newlines` 'normalize' reads Windows line ends (\r\n) as \n, 'keep' keeps \r as a character of its own.

    The cache sits beside the corpus (or in `cache_dir` when the corpus folder is read-only). A small JSON
    index records the corpus's size, modification time and sha256, so reopening an unchanged corpus costs
    a stat and a memory map, not a pass over the file.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"The corpus file {path} does not exist; pass data.path=/path/to/corpus.txt.")
    if path.is_dir():
        raise DataError(f"The corpus path {path} is a directory; pass data.path= a text file inside it.")
    if decode_errors not in ("strict", "replace", "ignore"):
        raise ConfigError(f"data.decode_errors={decode_errors!r} is not one of strict, replace, ignore.")
    if encoding not in ENCODINGS:
        raise ConfigError(f"data.encoding={encoding!r} is not one of {', '.join(ENCODINGS)}.")
    if newlines not in NEWLINES:
        raise ConfigError(f"data.newlines={newlines!r} is not one of {', '.join(NEWLINES)}.")
    stat = path.stat()
    if stat.st_size == 0:
        raise DataError(f"The corpus file {path} is empty; give it some text.")

    folder = Path(cache_dir_for(path, Path(cache_dir) if cache_dir else path.parent))
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
    index_path = folder / f"{path.name}.{key}.lmcache.json"
    index = _read_json(index_path)
    settings = {"format": CACHE_FORMAT, "decode_errors": decode_errors, "encoding": encoding, "newlines": newlines}

    def cache_ok(idx: dict | None) -> bool:
        return bool(idx) and all(idx.get(k) == v for k, v in settings.items()) and (folder / idx["ids_file"]).exists()

    fresh = cache_ok(index) and index["size"] == stat.st_size and index["mtime_ns"] == stat.st_mtime_ns
    if not fresh and cache_ok(index) and index["size"] == stat.st_size and file_sha256(path) == index["sha256"]:
        # touched but unchanged: record the new time, so the next open skips the hash again
        index = {**index, "mtime_ns": stat.st_mtime_ns}
        write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index, ensure_ascii=False)))
        fresh = True
    if fresh and (problem := _ids_problem(folder / index["ids_file"], index)):
        print(f"The id cache {folder / index['ids_file']} {problem}; rebuilding it from {path}.", file=sys.stderr)
        fresh = False
    if not fresh:
        stale = folder / index["ids_file"] if index and "ids_file" in index else None
        index = _build_cache(path, folder, index_path, settings)
        if stale is not None and stale.name != index["ids_file"]:
            stale.unlink(missing_ok=True)  # the ids of the corpus's previous contents
    ids = np.memmap(folder / index["ids_file"], dtype=np.dtype(index["dtype"]), mode="r")
    tokenizer = CharTokenizer(index["vocab"], byte_level=encoding == "bytes")
    return EncodedCorpus(ids=ids, tokenizer=tokenizer, sha256=index["sha256"])


def _build_cache(path: Path, folder: Path, index_path: Path, settings: dict) -> dict:
    stat = path.stat()
    reading = (settings["decode_errors"], settings["encoding"], settings["newlines"])
    vocab, sha256 = _scan_vocabulary(path, *reading)
    if not vocab:
        raise DataError(f"The corpus file {path} has no characters after decoding; give it some text.")
    tokenizer = CharTokenizer(vocab)
    # the settings that change the ids are in the name: two ways of reading one file never share a cache file
    kept = ".crlf" if settings["newlines"] == "keep" else ""
    ids_name = f"{path.name}.{sha256[:16]}{kept}.{tokenizer.dtype.name}"

    n_ids, crc32 = 0, 0

    def write_ids(tmp: Path) -> None:
        nonlocal n_ids, crc32
        with open(tmp, "wb") as out:
            for text, _ in _decoded_chunks(path, *reading):
                ids = tokenizer.encode_codepoints(text_to_codepoints(text))
                n_ids, crc32 = n_ids + len(ids), zlib.crc32(ids, crc32)
                ids.tofile(out)

    write_atomically(folder / ids_name, write_ids)
    index = {
        **settings,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": sha256,
        "vocab": vocab,
        "dtype": tokenizer.dtype.name,
        "ids_file": ids_name,
        "n_ids": n_ids,
        "crc32": crc32,
    }
    write_atomically(index_path, lambda tmp: tmp.write_text(json.dumps(index, ensure_ascii=False)))
    return index


def _ids_problem(ids_path: Path, index: dict) -> str | None:
    """What is wrong with an id cache file against its index (length first: a stat), or None when it matches."""
    expected = index["n_ids"] * np.dtype(index["dtype"]).itemsize
    actual = ids_path.stat().st_size
    if actual != expected:
        return f"has {actual} bytes, not the {expected} its index records"
    ids = np.memmap(ids_path, dtype=np.uint8, mode="r")
    crc32 = 0
    for start in range(0, len(ids), CHUNK_BYTES):
        crc32 = zlib.crc32(ids[start : start + CHUNK_BYTES], crc32)
    return None if crc32 == index["crc32"] else "does not match the checksum its index records"


def plural(count: int, noun: str) -> str:
    """'1 character', '2 characters'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
