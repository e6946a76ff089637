import http.server
import json
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from lm.corpus import encode_corpus
from lm.data import CharDataModule, RandomWindowBatches, ValidationWindows, split_bounds
from lm.errors import ConfigError, DataError
from lm.files import download
from lm.loss import IGNORE_INDEX
from lm.tokenizer import CharTokenizer


def test_tokenizer_round_trip_including_non_ascii():
    text = "Hello, wörld!\nΚαλημέρα 😀 tabs\tand spaces"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == "".join(sorted(set(text)))
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == text


def test_a_byte_level_tokenizer_turns_text_into_utf8_bytes_and_back():
    tok = CharTokenizer("".join(map(chr, range(256))), byte_level=True)
    text = "Café ☃"
    symbols = tok.to_symbols(text)
    assert symbols == "Caf\xc3\xa9 \xe2\x98\x83" and tok.to_text(symbols) == text
    assert tok.to_text("ab\xff") == "ab\ufffd"  # a byte that starts no UTF-8 character
    stream = tok.text_stream()  # a multi-byte character appears once its last byte has come
    assert [stream(c) for c in symbols] == ["C", "a", "f", "", "é", " ", "", "", "☃"]
    assert stream("\xe2") == "" and stream("", final=True) == "\ufffd"  # unfinished at the end
    plain = CharTokenizer("abé")  # a character model's symbols are its text
    assert plain.to_symbols("é") == "é" and plain.to_text("é") == "é" and plain.text_stream()("é") == "é"
    with pytest.raises(DataError, match="U\\+0000-U\\+00FF"):
        CharTokenizer("a☃", byte_level=True)


def test_tokenizer_names_unknown_characters():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(DataError, match="'z'"):
        tok.encode("abz")


def test_tokenizer_uses_uint16_for_large_vocabularies():
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300))
    tok = CharTokenizer.from_text(text)
    assert tok.dtype == np.uint16
    assert tok.decode(tok.encode(text)) == text


def test_encode_corpus_caches_ids_and_reopens_without_rebuilding(corpus):
    text = corpus.read_text()
    first = encode_corpus(corpus)
    assert first.tokenizer.decode(np.asarray(first.ids)) == text
    ids_files = list(corpus.parent.glob("corpus.txt.*.uint8"))
    assert len(ids_files) == 1
    mtime = ids_files[0].stat().st_mtime_ns
    second = encode_corpus(corpus)
    assert ids_files[0].stat().st_mtime_ns == mtime
    assert np.array_equal(np.asarray(first.ids), np.asarray(second.ids))
    # touched but unchanged: no rebuild, and the index learns the new time
    os.utime(corpus, ns=(corpus.stat().st_atime_ns, corpus.stat().st_mtime_ns + 10**9))
    encode_corpus(corpus)
    assert ids_files[0].stat().st_mtime_ns == mtime
    index = json.loads(next(corpus.parent.glob("corpus.txt.*.lmcache.json")).read_text())
    assert index["mtime_ns"] == corpus.stat().st_mtime_ns
    # a changed corpus gets a new cache, and the old one is removed
    corpus.write_text(text + "Zebra!")
    third = encode_corpus(corpus)
    assert third.tokenizer.decode(np.asarray(third.ids)).endswith("Zebra!")
    assert not ids_files[0].exists() and len(list(corpus.parent.glob("corpus.txt.*.uint8"))) == 1


def test_encode_corpus_streams_in_chunks(monkeypatch, tmp_path):
    # multi-byte characters split across chunk boundaries must survive
    import lm.corpus

    monkeypatch.setattr(lm.corpus, "CHUNK_BYTES", 7)
    text = "ab€cdé😀fg\n" * 50
    path = tmp_path / "u.txt"
    path.write_text(text, encoding="utf-8")
    corpus = encode_corpus(path)
    assert corpus.tokenizer.decode(np.asarray(corpus.ids)) == text


def test_cache_goes_to_fallback_when_folder_is_not_writable(corpus, tmp_path, monkeypatch):
    import lm.corpus

    real_access = os.access
    monkeypatch.setattr(
        lm.corpus.os, "access", lambda p, mode: False if Path(p) == corpus.parent else real_access(p, mode)
    )
    fallback = tmp_path / "cache"
    encode_corpus(corpus, cache_dir=fallback)
    assert list(fallback.glob("corpus.txt.*.uint8"))
    assert not list(corpus.parent.glob("corpus.txt.*.uint8"))


def test_invalid_utf8_names_byte_offset_and_can_be_replaced(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"hello world" + b"\xff" + b" more text")
    with pytest.raises(DataError, match="byte offset 11"):
        encode_corpus(path)
    corpus = encode_corpus(path, decode_errors="replace")
    assert "\ufffd" in corpus.tokenizer.vocab


@pytest.mark.parametrize("make", ["missing", "directory", "empty"])
def test_bad_corpus_paths_are_reported(tmp_path, make):
    path = tmp_path / "c.txt"
    if make == "directory":
        path.mkdir()
    elif make == "empty":
        path.write_text("")
    with pytest.raises(DataError, match=make if make != "missing" else "does not exist"):
        encode_corpus(path)


def test_split_sizes_and_too_short_splits(corpus):
    dm = CharDataModule(path=str(corpus), val_fraction=0.1, seq_length=16, batch_size=4)
    n = len(corpus.read_text())
    assert len(dm.split("val")) == int(n * 0.1)
    assert len(dm.split("train")) + len(dm.split("val")) == n
    with pytest.raises(DataError, match="validation split"):
        CharDataModule(path=str(corpus), val_fraction=0.001, seq_length=64).load()


@pytest.mark.parametrize("chunk_bytes", [7, 16 * 1024 * 1024])
def test_windows_line_ends_read_as_newlines_unless_kept(tmp_path, monkeypatch, chunk_bytes):
    import lm.corpus

    monkeypatch.setattr(lm.corpus, "CHUNK_BYTES", chunk_bytes)  # 7: some \r\n pairs straddle two chunks
    unix = "To be,\nor not\rto be.\n" * 40  # a lone \r is not a line end: it stays
    path = tmp_path / "windows.txt"
    path.write_bytes(unix.replace("\n", "\r\n").encode())
    normalized = encode_corpus(path)
    assert normalized.tokenizer.decode(np.asarray(normalized.ids)) == unix
    kept = encode_corpus(path, newlines="keep")
    assert kept.tokenizer.decode(np.asarray(kept.ids)) == unix.replace("\n", "\r\n")
    assert len(kept.tokenizer.vocab) == len(normalized.tokenizer.vocab)  # "\r" occurs alone too
    dm = CharDataModule(path=str(path), seq_length=8, batch_size=2)
    assert "\r\n" not in dm.tokenizer.decode(dm.split("train"))
    with pytest.raises(ConfigError, match="data.newlines='crlf' is not one of normalize, keep"):
        CharDataModule(path=str(path), newlines="crlf")


def test_a_crlf_corpus_has_the_vocabulary_of_its_lf_copy(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 30
    (tmp_path / "lf.txt").write_text(text)
    (tmp_path / "crlf.txt").write_bytes(text.replace("\n", "\r\n").encode())
    lf, crlf = encode_corpus(tmp_path / "lf.txt"), encode_corpus(tmp_path / "crlf.txt")
    assert crlf.tokenizer.vocab == lf.tokenizer.vocab and np.array_equal(np.asarray(crlf.ids), np.asarray(lf.ids))


def test_a_corpus_too_short_for_its_splits_is_refused_before_any_cache_is_written(tmp_path):
    path = tmp_path / "one.txt"
    path.write_text("a")
    with pytest.raises(DataError, match=r"has at most 1 character, fewer than data.seq_length \+ 1 = 17"):
        CharDataModule(path=str(path), seq_length=16).load()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.txt"]


@pytest.mark.parametrize("kwargs", [{"val_fraction": 0}, {"val_fraction": 1.0}, {"seq_length": 0}, {"batch_size": -1}])
def test_bad_data_settings_are_rejected(kwargs):
    with pytest.raises(ConfigError):
        CharDataModule(**kwargs)


def test_training_windows_shapes_targets_and_determinism(corpus):
    dm = CharDataModule(path=str(corpus), seq_length=32, batch_size=8, seed=3)
    train = dm.split("train")
    batches = RandomWindowBatches(train, 8, 32, num_batches=5, seed=3)
    x, y = batches.batch(0)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    # each row is a real window of the corpus
    ids = torch.from_numpy(np.asarray(train).astype(np.int64))
    row = x[0]
    starts = [s for s in range(len(ids) - 32) if torch.equal(ids[s : s + 32], row)]
    assert starts and torch.equal(ids[starts[0] + 1 : starts[0] + 33], y[0])
    # batch i depends only on (seed, rank, i)
    again = RandomWindowBatches(train, 8, 32, num_batches=5, seed=3, start_index=lambda: 2)
    assert torch.equal(next(iter(again))[0], batches.batch(2)[0])
    assert not torch.equal(batches.batch(0)[0], batches.batch(1)[0])
    assert len(list(batches)) == 5


@pytest.mark.parametrize("n_val,seq_length", [(101, 10), (105, 10), (11, 10), (57, 8)])
def test_validation_windows_cover_every_target_once(n_val, seq_length):
    ids = np.arange(n_val, dtype=np.int64) % 251
    counted = 0
    targets_seen = []
    for world_size in (1, 3):
        total = 0
        for rank in range(world_size):
            for x, y in ValidationWindows(ids, batch_size=4, seq_length=seq_length, rank=rank, world_size=world_size):
                assert x.shape[1] == seq_length
                assert torch.equal(x[:, 1:], torch.where(y[:, :-1] == IGNORE_INDEX, x[:, 1:], y[:, :-1]))
                valid = y[y != IGNORE_INDEX]
                total += valid.numel()
                if world_size == 1:
                    targets_seen.extend(valid.tolist())
        assert total == n_val - 1
        counted += total
    assert sorted(targets_seen) == sorted((np.arange(1, n_val) % 251).tolist())


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = lambda *a, **k: _Handler(*a, directory=str(root), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_and_writes_atomically(http_root, tmp_path):
    import hashlib

    root, url = http_root
    body = b"To be, or not to be\n" * 100
    (root / "corpus.txt").write_bytes(body)
    dest = tmp_path / "data" / "corpus.txt"
    download(f"{url}/corpus.txt", dest, hashlib.sha256(body).hexdigest())
    assert dest.read_bytes() == body

    bad = tmp_path / "data" / "bad.txt"
    with pytest.raises(DataError, match="sha256"):
        download(f"{url}/corpus.txt", bad, "0" * 64)
    assert not bad.exists()
    assert not [p for p in bad.parent.iterdir() if p.name.endswith(".tmp")]


def test_data_module_downloads_default_corpus_once(http_root, tmp_path):
    import hashlib

    from helpers import make_corpus_text

    root, url = http_root
    body = make_corpus_text().encode()
    (root / "input.txt").write_bytes(body)
    dm = CharDataModule(
        data_dir=str(tmp_path / "data"), url=f"{url}/input.txt", sha256=hashlib.sha256(body).hexdigest(), seq_length=16
    )
    assert dm.tokenizer.vocab_size == len(set(body.decode()))
    (root / "input.txt").unlink()  # a second data module must not need the network
    dm2 = CharDataModule(data_dir=str(tmp_path / "data"), url=f"{url}/input.txt", seq_length=16)
    assert dm2.tokenizer.vocab == dm.tokenizer.vocab


def test_offline_without_a_copy_says_where_to_put_the_file(tmp_path):
    dm = CharDataModule(data_dir=str(tmp_path / "data"), url="http://127.0.0.1:9/none.txt")
    with pytest.raises(DataError, match="data.path="):
        dm.load()


def _cache_files(corpus):
    (ids_file,) = corpus.parent.glob("corpus.txt.*.uint8")
    (index_file,) = corpus.parent.glob("corpus.txt.*.lmcache.json")
    return ids_file, index_file


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte"])
def test_a_damaged_id_cache_is_rebuilt_with_one_line(corpus, capsys, damage):
    text = corpus.read_text()
    encode_corpus(corpus)
    ids_file, index_file = _cache_files(corpus)
    assert json.loads(index_file.read_text())["n_ids"] == len(text)
    data = bytearray(ids_file.read_bytes())
    if damage == "truncate":
        ids_file.write_bytes(data[:1000])
    else:  # same length, one id changed in the middle: only the checksum can tell
        data[len(data) // 2] ^= 1
        ids_file.write_bytes(bytes(data))
    capsys.readouterr()
    reopened = encode_corpus(corpus)
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "rebuilding it" in message and str(ids_file) in message
    assert reopened.tokenizer.decode(np.asarray(reopened.ids)) == text
    encode_corpus(corpus)  # mended: the next open is quiet
    assert capsys.readouterr().err == ""


def test_cache_files_get_the_folders_usual_permissions(corpus):
    umask = os.umask(0o022)
    try:
        encode_corpus(corpus)
    finally:
        os.umask(umask)
    for path in _cache_files(corpus):
        assert path.stat().st_mode & 0o777 == 0o644, path  # 0666 less the umask, as for any new file


# --------------------------------------------------------------------------------------------------------------
# Benchmark corpora: zip downloads, byte encoding, splits by size, the training fraction


def _zipped(root: Path, name: str, member: str, body: bytes) -> None:
    import zipfile

    with zipfile.ZipFile(root / name, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(member, body)


def test_a_zipped_corpus_is_downloaded_extracted_checked_and_read_as_bytes(http_root, tmp_path):
    import hashlib

    root, url = http_root
    # enwik8-like: XML with bytes that are not valid UTF-8, read one byte per symbol
    body = (b"<page><title>Caf\xe9</title>\n<text>" + bytes(range(256)) + b"</text></page>\n") * 40
    _zipped(root, "bench.zip", "bench", body)
    settings = dict(url=f"{url}/bench.zip", name="bench", archive_member="bench", size=len(body), encoding="bytes")
    n = len(body)
    split_sizes = [n - 2000, 1000, 1000]
    dm = CharDataModule(
        data_dir=str(tmp_path / "data"),
        sha256=hashlib.sha256(body).hexdigest(),
        split_sizes=split_sizes,
        seq_length=16,
        **settings,
    )
    assert dm.tokenizer.vocab_size == 256  # every byte value occurs
    assert (tmp_path / "data" / "bench").read_bytes() == body
    assert not (tmp_path / "data" / "bench.zip").exists(), "the archive is deleted once the corpus is out"
    assert [len(dm.split(s)) for s in ("train", "val", "test")] == split_sizes
    assert dm.tokenizer.decode(dm.split("test")).encode("latin-1") == body[n - 1000 :]

    # a wrong checksum or size discards the extracted file and says what to do
    for bad in ({"sha256": "0" * 64}, {"sha256": None, "size": n + 1}):
        data_dir = tmp_path / f"bad{len(bad)}{bad.get('size')}"
        dm = CharDataModule(data_dir=str(data_dir), seq_length=16, **{**settings, "sha256": None, **bad})
        with pytest.raises(DataError, match="sha256|bytes, expected") as error:
            dm.load()
        assert "discarded" in str(error.value) and not (data_dir / "bench").exists()


def test_a_download_that_is_not_a_zip_says_so(http_root, tmp_path):
    root, url = http_root
    (root / "page.zip").write_text("<html>moved</html>")
    dm = CharDataModule(
        data_dir=str(tmp_path / "data"), url=f"{url}/page.zip", name="x", archive_member="x", sha256=None
    )
    with pytest.raises(DataError, match="not a zip archive holding x"):
        dm.load()
    assert list((tmp_path / "data").iterdir()) == []


def test_offline_an_archived_corpus_says_where_to_put_the_unzipped_file(tmp_path):
    dm = CharDataModule(data_dir=str(tmp_path / "data"), url="http://127.0.0.1:9/x.zip", name="x", archive_member="x")
    with pytest.raises(DataError, match=f"put the file at {tmp_path / 'data' / 'x'} yourself"):
        dm.load()


def test_split_bounds_by_size_and_by_fraction():
    assert split_bounds(100, 0.1) == {"train": (0, 90), "val": (90, 100)}
    assert split_bounds(100, 0.1, [80, 10, 5]) == {"train": (0, 80), "val": (80, 90), "test": (90, 95)}
    with pytest.raises(DataError, match="asks for 101 characters"):
        split_bounds(100, 0.1, [90, 10, 1])


def test_train_fraction_trains_on_the_head_of_the_training_split_and_keeps_validation(corpus):
    full = CharDataModule(path=str(corpus), seq_length=16, batch_size=4)
    quarter = CharDataModule(path=str(corpus), seq_length=16, batch_size=4, train_fraction=0.25)
    n_train = len(full.split("train"))
    assert len(quarter.split("train")) == int(n_train * 0.25)
    np.testing.assert_array_equal(quarter.split("train"), full.split("train")[: int(n_train * 0.25)])
    np.testing.assert_array_equal(quarter.split("val"), full.split("val"))
    with pytest.raises(DataError, match="no test split"):
        full.split("test")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_fraction": 0}, "train_fraction"),
        ({"train_fraction": 1.5}, "train_fraction"),
        ({"split_sizes": [10, 10]}, "three positive"),
        ({"encoding": "utf-16"}, "encoding"),
    ],
)
def test_bad_split_settings_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CharDataModule(**kwargs)


def test_the_batch_shape_schedule_grows_windows_and_batches_to_the_full_shape():
    from lm.data import BatchShapeSchedule

    off = BatchShapeSchedule(8, 64)
    assert {off.shape(step) for step in range(0, 1000, 7)} == {(8, 64)}
    # short sequences first: 16, 32, 64 at equal thirds of 9 steps, the same 8 x 64 characters every step
    seq = BatchShapeSchedule(8, 64, seq_length_start=16, seq_length_warmup_steps=9)
    assert [seq.shape(step) for step in range(11)] == [(32, 16)] * 3 + [(16, 32)] * 3 + [(8, 64)] * 5
    # batch-size warmup: 2 windows growing linearly to 8 at step 6
    batch = BatchShapeSchedule(8, 64, batch_size_start=2, batch_size_warmup_steps=6)
    assert [batch.batch_size_at(step) for step in range(8)] == [2, 3, 4, 5, 6, 7, 8, 8]
    both = BatchShapeSchedule(
        8, 64, batch_size_start=2, batch_size_warmup_steps=6, seq_length_start=32, seq_length_warmup_steps=4
    )
    assert [both.shape(step) for step in (0, 2, 5, 6)] == [(4, 32), (4, 64), (7, 64), (8, 64)]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (
            {"seq_length_start": 48, "seq_length_warmup_steps": 10},
            r"seq_length_start=48 must be data.seq_length=64 halved",
        ),
        ({"seq_length_start": 128}, r"data.seq_length_start=128 must be"),
        ({"seq_length_start": 0}, r"data.seq_length_start=0 must be"),
        ({"batch_size_start": 9}, r"batch_size_start=9 must be a whole number of windows from 1 to data.batch_size=8"),
        ({"batch_size_start": 2, "batch_size_warmup_steps": -1}, r"data.batch_size_warmup_steps=-1 must be a whole"),
        ({"seq_length_warmup_steps": 1.5}, r"data.seq_length_warmup_steps=1.5 must be a whole"),
    ],
)
def test_bad_batch_shape_schedules_are_rejected(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CharDataModule(seq_length=64, batch_size=8, **kwargs)


def test_scheduled_batches_are_real_windows_of_each_steps_shape_and_unchanged_when_off(corpus):
    from lm.data import BatchShapeSchedule

    train = CharDataModule(path=str(corpus), seq_length=32, batch_size=4).split("train")
    plain = RandomWindowBatches(train, 4, 32, num_batches=6, seed=5)
    off = RandomWindowBatches(train, 4, 32, num_batches=6, seed=5, schedule=BatchShapeSchedule(4, 32))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(plain, off, strict=True))

    schedule = BatchShapeSchedule(
        4, 32, batch_size_start=1, batch_size_warmup_steps=3, seq_length_start=8, seq_length_warmup_steps=3
    )
    # two batches per optimizer step (gradient accumulation): both micro-batches have that step's shape
    batches = RandomWindowBatches(train, 4, 32, num_batches=8, seed=5, schedule=schedule, accumulate=2)
    shapes = [tuple(x.shape) for x, _ in batches]
    assert shapes == [(4, 8), (4, 8), (4, 16), (4, 16), (3, 32), (3, 32), (4, 32), (4, 32)]
    ids = torch.from_numpy(np.asarray(train).astype(np.int64))
    x, y = batches.batch(0)
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, target in zip(x, y, strict=True):  # each row and its targets: one window of 9 characters
        assert any(torch.equal(ids[s : s + 9], torch.cat([row, target[-1:]])) for s in range(len(ids) - 8))


def test_a_run_with_short_sequences_and_small_batches_first_trains_each_shape_and_resumes_exactly(
    tmp_path, corpus, cli
):
    import lightning as L
    from helpers import FAST, last_checkpoint, only_run

    from lm.config import compose_config
    from lm.train import train

    class RecordShapes(L.Callback):
        def __init__(self):
            self.shapes = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.shapes.append(tuple(batch[0].shape))

    common = [
        f"data.path={corpus}",
        *FAST,
        "data.batch_size_start=2",
        "data.batch_size_warmup_steps=6",
        "data.seq_length_start=8",
        "data.seq_length_warmup_steps=6",
        "lr_schedule.warmup_steps=2",
        "lr_schedule.total_steps=10",
    ]
    recorder, straight = RecordShapes(), tmp_path / "straight"
    overrides = [*common, "trainer.max_steps=10", f"paths.output_dir={straight}", f"paths.run_dir={straight / 'run'}"]
    metrics = train(compose_config(overrides), callbacks=[recorder])
    # batch 2..8 over 6 steps; windows of 8, 16, 32 characters at thirds of 6 steps (FAST: batch 8, context 32)
    assert recorder.shapes == [(8, 8), (12, 8), (8, 16), (10, 16), (6, 32), (7, 32)] + [(8, 32)] * 4
    assert math.isfinite(metrics["val/loss"])

    split = tmp_path / "split"
    cli.train([*common, "trainer.max_steps=5"], split)
    cli.train([*common, "trainer.max_steps=10", f"resume={only_run(split / 'outputs')}"], split)
    a, b = last_checkpoint(straight / "run"), last_checkpoint(only_run(split / "outputs"))
    assert a["global_step"] == b["global_step"] == 10
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(value, b["state_dict"][key], atol=1e-6, rtol=0, msg=key)
