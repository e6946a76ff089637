"""Sampling with and without the KV cache, safe checkpoint loading, and the generate/evaluate scripts."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, VOCAB, make_corpus_text, random_model, run_script
from torch._dynamo.utils import counters

from lm import generate, load_model
from lm.decoding import decode_linear, decode_step, decoding_matrices, rewind_cache, sliding_cache
from lm.errors import CheckpointError, ConfigError, DataError
from lm.model import POSITIONAL_ENCODINGS, KVCache, Transformer, TransformerConfig
from lm.past_context import past_context_losses
from lm.tokenizer import CharTokenizer


def one_layer_model(pe: str) -> Transformer:
    """One layer, context 8: a key and value depend only on their character and position, so a cache that slides
    past the context must give exactly the logits of a sliding window."""
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=len(VOCAB), seq_length=8, n_layer=1, n_head=2, n_embd=16, pos_encoding={"name": pe}
    )
    return Transformer(config).eval()


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_incremental_logits_match_full_forward(pe):
    model = random_model(pe)
    idx = torch.randint(0, len(VOCAB), (2, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
        parts = [model(idx[:, :7], cache), model(idx[:, 7:8], cache), model(idx[:, 8:20], cache)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-4)


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize("batch", [1, 3, 20])  # up to 16 rows take the CPU's row-block products, more the plain ones
def test_decode_step_matches_full_forward_at_every_position(pe, batch):
    model = random_model(pe)
    idx = torch.randint(0, len(VOCAB), (batch, 24))
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(model.config, batch, 24, "cpu", torch.float32)
        model(idx[:, :5], cache)
        for t in range(5, 24):
            logits = decode_step(model, idx[:, t], cache.positions[t], cache)
            cache.length += 1
            assert torch.allclose(logits, full[:, t], atol=1e-4), f"position {t}"


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_an_eager_step_reads_only_the_filled_part_of_the_cache(pe):
    model = random_model(pe)
    idx = torch.randint(0, len(VOCAB), (2, 12))
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(model.config, 2, 24, "cpu", torch.float32)
        model(idx[:, :11], cache)
        for kv in cache.kv:
            kv[:, :, :, 11:] = float("nan")  # what a masked read of the unfilled positions would turn into NaN
        logits = decode_step(model, idx[:, 11], cache.positions[11], cache)
    assert torch.allclose(logits, full[:, 11], atol=1e-4)


FBGEMM = "fbgemm" in torch.backends.quantized.supported_engines
needs_fbgemm = pytest.mark.skipif(not FBGEMM, reason="no FBGEMM in this PyTorch build")


@pytest.mark.parametrize(
    "pe,batch_size",
    [
        ("rope", 1),
        ("alibi", 1),
        pytest.param("rope", 8, marks=needs_fbgemm),
        pytest.param("alibi", 3, marks=needs_fbgemm),
    ],
)
def test_float16_matrices_keep_the_logits_within_their_rounding(pe, batch_size):
    model = random_model(pe)
    matrices = decoding_matrices(model, batch_size)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert set(matrices) == set(linears)
    if batch_size == 1:  # float16 copies
        assert all(w.dtype == torch.float16 for w in matrices.values())
    else:  # packed for FBGEMM: products with the float16-rounded weights, in float32
        for m, packed in matrices.items():
            x, residual = torch.randn(batch_size, m.in_features), torch.randn(batch_size, m.out_features)
            expected = residual + x @ m.weight.half().float().T
            assert torch.allclose(decode_linear(x, m, packed, residual), expected, rtol=1e-5, atol=1e-5)
    bound = 1e-2 if batch_size == 1 else 3e-2  # the worst of several rows of this N(0, 0.5) model: up to ~2e-2
    idx = torch.randint(0, len(VOCAB), (batch_size, 24))
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(model.config, batch_size, 24, "cpu", torch.float32, matrices)
        model(idx[:, :5], cache)
        for t in range(5, 24):
            logits = decode_step(model, idx[:, t], cache.positions[t], cache)
            cache.length += 1
            error = (logits - full[:, t]).abs().max() / full[:, t].abs().max()
            assert 1e-6 < error < bound, f"position {t}: relative error {error}"  # rounded, but only just


def test_float16_matrices_only_where_they_pay():
    model = random_model("rope")
    assert bool(decoding_matrices(model, batch_size=8)) == FBGEMM  # packed for FBGEMM's float16-weight product
    assert decoding_matrices(model, batch_size=8, compile=True) == {}  # torch.compile cannot trace packed weights
    assert decoding_matrices(model, batch_size=32) == {}  # many rows: float32 products are efficient
    assert decoding_matrices(model.to(torch.bfloat16), batch_size=1) == {}  # not a float32 model
    big = random_model("rope")
    with torch.no_grad():
        big.blocks[0].mlp.fc.weight[0, 0] = 1e5  # beyond float16's range
    assert decoding_matrices(big, batch_size=1) == {}
    assert decoding_matrices(big, batch_size=8) == {}


def test_compiled_decoding_gives_the_same_greedy_text():
    model, tok = random_model("rope"), CharTokenizer(VOCAB)
    # past twice the context (24): the cache slides and is rewound once
    kwargs = dict(prompt="To be", max_new_tokens=50, temperature=0)
    for exact in (True, False):  # compiled with the model's weights, and with float16 copies
        assert generate(model, tok, compile=True, exact=exact, **kwargs) == generate(model, tok, exact=exact, **kwargs)
    graphs = counters["stats"]["unique_graphs"]
    generate(model, tok, compile=True, prompt="To", max_new_tokens=7)  # another length: compiled once is enough
    assert counters["stats"]["unique_graphs"] == graphs


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_greedy_text_is_identical_with_and_without_cache(pe):
    model, tok = random_model(pe), CharTokenizer(VOCAB)
    for prompt in ("To be", "To be, or not to be:"):  # shorter and longer than half the context
        kwargs = dict(prompt=prompt, max_new_tokens=24 - len(prompt), temperature=0)  # fills the context exactly
        assert generate(model, tok, exact=True, **kwargs) == generate(model, tok, kv_cache=False, **kwargs)


@pytest.mark.parametrize("pe", ["rope", "alibi"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_sliding_cache_equals_the_sliding_window_for_one_layer(pe, batch):
    # with one layer, a key and value depend only on their character and position, so a cache that slides past the
    # context (ring slots, RoPE's positions rewound) must give exactly the logits of the last seq_length characters
    model = one_layer_model(pe)
    config = model.config
    assert sliding_cache(model)
    idx = torch.randint(0, len(VOCAB), (batch, 45))  # past two rewinds (at 16 and, rewound to 8, again at 16)
    with torch.inference_mode():
        cache = KVCache(config, batch, 8, "cpu", torch.float32)
        model(idx[:, :5], cache)
        for t in range(5, 45):
            if cache.length == 16:
                rewind_cache(model, cache)
            logits = decode_step(model, idx[:, t], cache.positions[cache.length], cache)
            cache.length += 1
            window = model(idx[:, max(0, t - 7) : t + 1])[:, -1]
            assert torch.allclose(logits, window, atol=1e-5), f"position {t}"


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_only_caches_that_cannot_slide_are_rebuilt(pe):
    model, tok = random_model(pe, seq_length=16), CharTokenizer(VOCAB)
    forwards = []
    model.forward = lambda *args, **kwargs: forwards.append(1) or Transformer.forward(model, *args, **kwargs)
    generate(model, tok, "a", max_new_tokens=60, temperature=1.0, seed=0)
    # sliding: one forward, the prompt's; rebuilt: also whenever the cache is full (16 positions), from the last 8
    # characters plus the new one: at the 17th call, then every 9th (26, 35, 44, 53)
    assert len(forwards) == (1 if pe in ("rope", "alibi", "t5") else 1 + 5)


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_generation_continues_past_the_context_length(pe):
    model, tok = random_model(pe, seq_length=16), CharTokenizer(VOCAB)
    for kv_cache in (True, False):
        text = generate(model, tok, "a", max_new_tokens=60, temperature=1.0, seed=0, kv_cache=kv_cache)[0]
        assert len(text) == 61 and text.startswith("a")


def test_same_seed_same_text_and_sampling_filters():
    model, tok = random_model("rope"), CharTokenizer(VOCAB)
    a = generate(model, tok, "hi", 30, temperature=1.0, seed=7)
    assert a == generate(model, tok, "hi", 30, temperature=1.0, seed=7)
    assert a != generate(model, tok, "hi", 30, temperature=1.0, seed=8)
    greedy = generate(model, tok, "hi", 30, temperature=0)
    assert generate(model, tok, "hi", 30, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, tok, "hi", 30, temperature=1.0, top_p=1e-6, seed=1) == greedy
    samples = generate(model, tok, "hi", 10, num_samples=3, seed=0)
    assert len(samples) == 3 and all(len(s) == 12 for s in samples)


def test_prompt_errors_and_empty_prompt():
    model, tok = random_model("rope"), CharTokenizer(VOCAB)
    with pytest.raises(DataError, match="'#'"):
        generate(model, tok, "hi #", 5)
    with pytest.raises(ConfigError, match="one string, not a list"):
        generate(model, tok, ["hi", "ho"], 5)
    assert generate(model, tok, "", 5, seed=0)[0].startswith("\n")


def test_decoding_threads_follow_the_models_size_and_training_threads_come_back(monkeypatch):
    from lm.generate import WEIGHTS_PER_DECODING_THREAD, decoding_threads

    model, tok = random_model("rope"), CharTokenizer(VOCAB)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert decoding_threads(model) == 1 and decoding_threads(model, num_samples=16) == 1
        seen = []
        generate(model, tok, "hi", 3, seed=0, on_token=lambda ids: seen.append(torch.get_num_threads()))
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2  # one thread while decoding, then put back
        generate(model, tok, "hi", 2, seed=0, threads=2, on_token=lambda ids: seen.append(torch.get_num_threads()))
        assert seen[-2:] == [2, 2]
        monkeypatch.setattr(model, "num_parameters", lambda: 2 * WEIGHTS_PER_DECODING_THREAD)
        assert decoding_threads(model) == 2
        torch.set_num_threads(1)
        assert decoding_threads(model) == 1  # never more than the process has
        with pytest.raises(ConfigError, match="threads=0 must be a positive integer"):
            generate(model, tok, "hi", 2, threads=0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_new_tokens": -1},
        {"max_new_tokens": True},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_p": "high"},
        {"temperature": -0.1},
        {"temperature": "abc"},  # what Hydra passes for temperature=abc
        {"top_k": 0},
        {"top_k": 2.5},
        {"seed": -1},
        {"seed": "abc"},
        {"num_samples": 0},
        {"kv_cache": "maybe"},
        {"kv_cache": 0},
        {"exact": "perhaps"},
        {"compile": "sometimes"},
    ],
)
def test_bad_sampling_arguments_are_rejected(kwargs):
    model, tok = random_model("rope"), CharTokenizer(VOCAB)
    args = {"prompt": "hi", "max_new_tokens": 5, **kwargs}
    with pytest.raises(ConfigError):
        generate(model, tok, **args)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints and scripts


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "corpus.txt"
    corpus.write_text(make_corpus_text(8000))
    run_script(
        "train.py",
        f"paths.output_dir={tmp / 'outputs'}",
        f"data.path={corpus}",
        "model=tiny",
        "pos_encoding=learned",
        "data.seq_length=32",
        "data.batch_size=8",
        "trainer.max_steps=25",
        "trainer.precision=32-true",
        "callbacks.text_sample.max_new_tokens=0",
        "callbacks.throughput.peak_flops=null",
        "logger=csv",
        in_process=True,
    )
    run = next((tmp / "outputs" / "runs").iterdir())
    return run, corpus


def test_load_model_from_run_dir_and_file(trained_run):
    run, corpus = trained_run
    model, tok = load_model(run)
    assert tok.vocab == "".join(sorted(set(corpus.read_text())))
    assert not model.training
    model2, _ = load_model(run / "checkpoints" / "last.ckpt")
    assert model.config == model2.config


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_that_would_run_code_is_refused(tmp_path, trained_run):
    run, _ = trained_run
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    evil = _RunsCode()
    evil.marker = tmp_path / "pwned"
    checkpoint["extra"] = evil
    path = tmp_path / "evil.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match="could run code"):
        load_model(path)
    assert not evil.marker.exists()


def test_missing_truncated_and_foreign_checkpoints(tmp_path, trained_run):
    run, _ = trained_run
    with pytest.raises(
        CheckpointError, match="does not exist; give load_model a .ckpt file, a run directory or an export"
    ) as e:
        load_model(tmp_path / "nope.ckpt")
    assert "ckpt=" not in str(e.value)  # worded for a Python caller, not for the command line
    data = (run / "checkpoints" / "last.ckpt").read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(tmp_path / "truncated.ckpt")
    torch.save({"state_dict": {}, "hello": 1}, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointError, match="not a checkpoint of transformer-lm"):
        load_model(tmp_path / "foreign.ckpt")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(CheckpointError, match="holds no"):
        load_model(tmp_path / "empty_run")


def test_generate_script_streams_text_to_stdout_only(trained_run, cli):
    run, _ = trained_run
    prompt = "The king, my lord."  # Hydra's grammar reserves ','; the script quotes the prompt for it
    args = [f"ckpt={run}", f"prompt={prompt}", "max_new_tokens=14", "temperature=0"]  # 18 + 14 = the 32 context
    cached = cli.script("generate.py", *args)
    assert cached.stdout.startswith(prompt) and len(cached.stdout) == len(prompt) + 14 + 1
    assert "[generate]" in cached.stderr and "[generate]" not in cached.stdout
    uncached = cli.script("generate.py", *args, "kv_cache=false")
    assert uncached.stdout == cached.stdout
    seeded = [
        cli.script("generate.py", f"ckpt={run}", "seed=3", "max_new_tokens=30", "num_samples=2").stdout
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_a_byte_level_model_takes_and_writes_utf8_text(tmp_path, cli):

    # data.encoding=bytes (enwik8): the model's symbols are bytes, but prompts and samples are UTF-8 text
    text = make_corpus_text(3000) + "Café naïve ☃\n" * 60
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    train = ["model=tiny", "data.encoding=bytes", "data.seq_length=32", "trainer.max_steps=30", "logger=csv",
             "callbacks.text_sample.prompt='Café'", "callbacks.throughput.peak_flops=null"]  # fmt: skip
    cli.script("train.py", f"paths.output_dir={tmp_path / 'outputs'}", f"data.path={corpus}", *train)
    run = next((tmp_path / "outputs" / "runs").iterdir())
    sample = (run / "sample.txt").read_text()
    assert sample.startswith("Café") and "CafÃ©" not in sample  # not the prompt's bytes shown as latin-1 letters
    model, tok = load_model(run)
    assert tok.byte_level and tok.to_symbols("é") == "\xc3\xa9"

    def expected(prompt: str, n: int, **kwargs) -> str:  # the model's bytes read as UTF-8 (U+FFFD where invalid)
        texts = generate(model, tok, tok.to_symbols(prompt), n, **kwargs)
        return "".join(tok.to_text(t) for t in texts) + "\n"

    one = cli.script("generate.py", f"ckpt={run}", "prompt=naïve ☃", "max_new_tokens=60", "temperature=0").stdout
    assert one.startswith("naïve ☃") and one == expected("naïve ☃", 60, temperature=0)
    args = ["prompt=☃", "max_new_tokens=40", "num_samples=2", "seed=5"]
    two = cli.script("generate.py", f"ckpt={run}", *args).stdout
    assert two.count("☃") >= 2 and two == expected("☃", 40, num_samples=2, seed=5, temperature=0.8)


def test_generate_script_stops_quietly_when_the_reader_of_its_output_quits(trained_run):
    run, _ = trained_run  # as in `python scripts/generate.py ... | head -c 10`
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = [f"ckpt={run}", "max_new_tokens=100000"]
    with subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "generate.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as process:
        assert len(process.stdout.read(10)) == 10
        process.stdout.close()  # the reader quits while the text still streams
        stderr = process.stderr.read().decode()
        returncode = process.wait(timeout=120)
    assert returncode == 141 and "Traceback" not in stderr and "Error" not in stderr, stderr[-3000:]


@pytest.mark.parametrize(
    "args,message",
    [
        (["prompt=the #king"], "'#'"),
        (["max_new_tokens=-5"], "max_new_tokens"),
        (["top_p=1.5"], "top_p"),
        (["temperature=-1"], "temperature"),
        (["kv_cache=maybe"], "error: kv_cache=maybe must be true or false."),
        (["kv_cache=0"], "error: kv_cache=0 must be true or false."),
        (["exact=perhaps"], "error: exact=perhaps must be true or false."),
        (["compile=sometimes"], "error: compile=sometimes must be true or false."),
        (["threads=0"], "error: threads=0 must be a positive integer, or auto"),
    ],
)
def test_generate_script_bad_input(trained_run, args, message, cli):
    run, _ = trained_run
    result = cli.script("generate.py", f"ckpt={run}", *args, check=False)
    assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("script", ["generate.py", "evaluate.py"])
@pytest.mark.parametrize(
    "override", ["model.mlp=relu", "pos_encoding=rope", "+model.mlp=relu", "model=mini", "~model.qk_norm"]
)
def test_model_settings_on_a_checkpoint_are_refused_in_one_line(trained_run, script, override, cli):
    run, _ = trained_run
    result = cli.script(script, f"ckpt={run}", override, check=False)
    assert result.returncode == 1 and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {override}: the model's settings come from its checkpoint")


@pytest.mark.parametrize("script", ["generate.py", "evaluate.py"])
def test_a_script_without_its_required_checkpoint_says_what_to_pass(script, cli):
    result = cli.script(script, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt= is required; pass a run directory or a .ckpt file, e.g. ckpt=outputs/runs/<run>/."
    )


def test_generate_script_missing_checkpoint(tmp_path, cli):
    result = cli.script("generate.py", f"ckpt={tmp_path / 'missing.ckpt'}", check=False)
    assert result.returncode == 1 and "does not exist; pass ckpt= a .ckpt file or a run directory" in result.stderr


def test_evaluate_matches_training_and_reports_lengths(trained_run, cli):
    run, corpus = trained_run
    logged = [line for line in (run / "csv" / "metrics.csv").read_text().splitlines()[1:] if line]
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    val_losses = [
        float(row.split(",")[header.index("val/loss")]) for row in logged if row.split(",")[header.index("val/loss")]
    ]
    result = cli.script(
        "evaluate.py",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "precision=32",
        "context_lengths=[16,32,64]",
        "past_context=40",
    )
    report = json.loads((run / "checkpoints" / "last.ctx16-32-64.past40.eval.json").read_text())
    rows = {r["context_length"]: r for r in report["results"]}
    assert rows[32]["loss"] == pytest.approx(val_losses[-1], abs=1e-4)
    assert rows[32]["tokens"] == int(len(corpus.read_text()) * 0.1) - 1
    assert rows[64]["loss"] is None and "learned positions stop at 32" in rows[64]["note"]
    assert "| 64 |" in result.stdout and (run / "checkpoints" / "last.ctx16-32-64.past40.eval.md").exists()
    assert f"wrote {run / 'checkpoints' / 'last.ctx16-32-64.past40'}.eval.md" in result.stderr
    # past the context, learned positions: recomputing the window and rebuilding the cache, no sliding cache
    losses = report["past_context"]["losses"]
    assert set(losses) == {"window", "rebuilt cache"} and all(0 < v < 10 for v in losses.values())
    assert "| rebuilt cache:" in result.stdout and "sliding" not in result.stdout
    other = cli.script("evaluate.py", f"ckpt={run}", f"data.path={corpus}", "precision=32", "context_lengths=16")
    assert "all of" in other.stderr and "| 16 |" in other.stdout  # one length without brackets is a list of one
    # each evaluation keeps its own report: the default one, and one named by the file and length read
    default = cli.script("evaluate.py", f"ckpt={run / 'checkpoints' / 'last.ckpt'}", "precision=32")
    assert "| 32 |" in default.stdout
    reports = sorted(p.name for p in (run / "checkpoints").glob("*.eval.md"))  # (ckpt=<run dir> reads best.ckpt)
    assert reports == ["best.corpus.ctx16.eval.md", "last.ctx16-32-64.past40.eval.md", "last.eval.md"], reports


def test_evaluate_split_test_reads_the_held_out_tail_and_a_corpus_without_one_says_so(trained_run, tmp_path, cli):

    from lm.checkpoint import load_model
    from lm.evaluate import evaluate

    # a corpus split by size, as enwik8 and text8 are: 6,000 training, 1,000 validation, 1,000 test characters
    text = make_corpus_text(8000)
    corpus = tmp_path / "bench.txt"
    corpus.write_text(text)
    cli.script(
        "train.py",
        f"paths.output_dir={tmp_path / 'outputs'}",
        f"data.path={corpus}",
        "data.split_sizes=[6000,1000,1000]",
        "model=tiny",
        "data.seq_length=32",
        "data.batch_size=8",
        "trainer.max_steps=5",
        "trainer.precision=32-true",
        "callbacks.text_sample.max_new_tokens=0",
        "callbacks.throughput.peak_flops=null",
        "logger=csv",
    )
    run = next((tmp_path / "outputs" / "runs").iterdir())
    result = cli.script("evaluate.py", f"ckpt={run}", "split=test", "precision=32")
    assert "test split of" in result.stderr and "characters 7000-8000" in result.stderr
    report = json.loads(next(run.glob("checkpoints/*.test.eval.json")).read_text())
    model, tokenizer = load_model(next(run.glob("checkpoints/*.test.eval.json")).parent / "last.ckpt")
    expected = evaluate(model, tokenizer.encode(text[7000:]), 32, 16, None)
    assert report["results"][0]["loss"] == pytest.approx(expected.loss, abs=1e-5)
    assert report["results"][0]["tokens"] == 999

    # Tiny Shakespeare's way (a validation tail by fraction) holds out no test split: one sentence, exit 1
    old, _ = trained_run
    refused = cli.script("evaluate.py", f"ckpt={old}", "split=test", check=False)
    assert refused.returncode == 1
    assert "has no test split" in refused.stderr and "split=val" in refused.stderr
    assert "Traceback" not in refused.stderr


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=0", "data.batch_size=0 must be a positive integer"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must be between 0 and 1"),
        ("precision=16", "precision=16 must be auto, bf16 or 32"),
        ("split=train", "split=train must be val or test"),
        ("past_context=true", "past_context=True must be a positive"),
        ("output=/proc/no/such/x", "output=/proc/no/such/x: its folder cannot be made"),
    ],
)
def test_evaluate_settings_are_checked_before_a_checkpoint_is_loaded(override, message, monkeypatch):
    from omegaconf import OmegaConf

    from lm.commands import check_evaluation_settings

    cfg = OmegaConf.merge(OmegaConf.load(ROOT / "conf" / "evaluate.yaml"), OmegaConf.from_dotlist([override]))
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_evaluation_settings(cfg)


def test_evaluate_past_the_context_bad_input(trained_run, tmp_path, cli):
    run, _ = trained_run
    for value, message in (
        ("0", "past_context=0 must be a positive"),
        ("true", "past_context=True must be a positive"),  # YAML's true loads as a bool, which Python counts as 1
        ("100000", "past_context=100000 needs"),
    ):
        bad = cli.script("evaluate.py", f"ckpt={run}", f"past_context={value}", f"output={tmp_path / 'b'}", check=False)
        assert bad.returncode != 0 and message in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "b.eval.json").exists()


@pytest.mark.parametrize("pe", ["rope", "alibi"])
def test_past_context_losses_read_the_text_as_generation_does(pe):
    # one layer: the sliding cache gives exactly the window's logits, the rebuilt cache (less context) others
    model = one_layer_model(pe)
    ids = np.random.default_rng(0).integers(0, len(VOCAB), 200)
    losses = past_context_losses(model, ids, characters=30, streams=3)
    assert losses["sliding cache"] == pytest.approx(losses["window"], abs=1e-5)
    assert abs(losses["rebuilt cache"] - losses["window"]) > 1e-4
