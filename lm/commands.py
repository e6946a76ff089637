"""The bodies of the scripts besides training: sampling text (`generate.py`), evaluating a checkpoint
(`evaluate.py`), exporting one to the Hugging Face format (`export.py`) and a sweep's report (`compare.py`, and
`WriteReport`, the Hydra callback that writes a study's report when its last job ends)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lm.checkpoint import CHECKPOINT_KEY, as_override, find_checkpoint, load_model, read_checkpoint
from lm.config import PROJECT_ROOT
from lm.corpus import ENCODINGS, encode_corpus
from lm.data import split_bounds
from lm.errors import ConfigError, DataError, is_count, is_number
from lm.evaluate import evaluate, results_table, write_eval_report
from lm.generate import check_sampling_args, check_switches, decoding_threads, default_prompt, generate
from lm.hardware import bf16_supported, resolve_device
from lm.past_context import past_context_losses, past_context_table
from lm.report import write_sweep_report
from lm.tokenizer import CharTokenizer

PAST_CONTEXT_STREAMS = 8  # stretches of the split read side by side for past_context


def export_model(cfg: DictConfig) -> None:
    """export.py: writes `cfg.ckpt`'s model to the new directory `cfg.out` in the Hugging Face format, and says in
    one line which way it took (a native `transformers` class or custom code) and how close the logits are."""
    from lm.hub.export import export  # its optional packages load only here

    print(export(cfg.ckpt, cfg.out).line())


def generate_text(cfg: DictConfig) -> None:
    """generate.py: samples text from `cfg.ckpt` and streams it to stdout (diagnostics to stderr)."""
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.num_samples)
    check_switches(kv_cache=cfg.kv_cache, compile=cfg.compile, exact=cfg.exact)
    if cfg.threads != "auto" and not is_count(cfg.threads):
        raise ConfigError(f"threads={cfg.threads} must be a positive integer, or auto (by the model's size).")
    device = resolve_device(cfg.device)
    extension = OmegaConf.to_container(cfg.model.pos_encoding)
    # the command line's error wording
    model, tokenizer = load_model(find_checkpoint(cfg.ckpt), device=device, rope_scaling=extension)
    threads = None if cfg.threads == "auto" else cfg.threads
    on = f"on {device}"
    if device == "cpu":
        on += f" ({threads or decoding_threads(model, cfg.num_samples)} threads)"
    print(
        f"[generate] {model.config.n_layer} layers x {model.config.n_embd}, "
        f"{positions_summary(model)}, context {model.config.seq_length}, {on}, "
        + ", ".join(as_override(key, cfg[key]) for key in ("kv_cache", "compile", "exact")),
        file=sys.stderr,
        flush=True,
    )
    # a byte-level model (data=enwik8) reads the prompt as its UTF-8 bytes, and its output is read back as UTF-8
    prompt = tokenizer.to_symbols(str(cfg.prompt)) or default_prompt(tokenizer)
    tokenizer.encode(prompt)  # unknown characters: one clear sentence before any output
    seed = cfg.seed if cfg.seed is not None else int(torch.seed() % 2**31)  # printed, so any text can be redone
    readable = tokenizer.text_stream()

    def stream(ids: torch.Tensor) -> None:
        sys.stdout.write(readable(tokenizer.decode(ids)))
        sys.stdout.flush()

    # one sample streams as it is made; several are made together, as one batch (about as fast as one), then printed
    sys.stdout.write(readable(prompt) if cfg.num_samples == 1 else "")
    sys.stdout.flush()
    start = time.perf_counter()
    texts = generate(
        model,
        tokenizer,
        prompt,
        cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        num_samples=cfg.num_samples,
        seed=seed,
        kv_cache=cfg.kv_cache,
        on_token=stream if cfg.num_samples == 1 else None,
        compile=cfg.compile,
        exact=cfg.exact,
        threads=threads,
    )
    elapsed = time.perf_counter() - start
    if cfg.num_samples > 1:
        for i, text in enumerate(texts):
            print(f"\n----- sample {i + 1} of {cfg.num_samples} -----", file=sys.stderr, flush=True)
            sys.stdout.write(tokenizer.to_text(text))
            sys.stdout.flush()
    else:
        sys.stdout.write(readable("", final=True))  # a byte-level sample's unfinished last character, if any
    sys.stdout.write("\n")
    sys.stdout.flush()
    total = cfg.max_new_tokens * cfg.num_samples
    print(
        f"[generate] {total} characters in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.0f} chars/s), seed {seed}",
        file=sys.stderr,
        flush=True,
    )


def positions_summary(model) -> str:
    """`rope positions`, or with a context extension `rope positions (yarn x4 of 128)`."""
    pe = model.config.pos_encoding
    if pe.scaling is None:
        return f"{pe.name} positions"
    return (
        f"{pe.name} positions ({pe.scaling} x{pe.scaling_factor:g} of {pe.original_length or model.config.seq_length})"
    )


def check_evaluation_settings(cfg: DictConfig) -> None:
    """The settings that need no checkpoint, checked before one is loaded, so that a bad one fails at once."""
    if cfg.split not in ("val", "test"):
        raise ConfigError(f"split={cfg.split} must be val or test.")
    if cfg.split == "test" and cfg.data.path is not None:
        raise ConfigError("split=test reads the training corpus's test split; with data.path= the whole file is read.")
    if str(cfg.precision) not in ("auto", "bf16", "32"):
        raise ConfigError(f"precision={cfg.precision} must be auto, bf16 or 32.")
    if cfg.past_context is not None and not is_count(cfg.past_context):
        raise ConfigError(
            f"past_context={cfg.past_context} must be a positive number of characters, e.g. 1000, or null."
        )
    if not is_count(cfg.data.batch_size):
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} must be a positive integer.")
    fraction = cfg.data.val_fraction
    if fraction is not None and (not is_number(fraction) or not 0 < fraction < 1):
        raise ConfigError(f"data.val_fraction={fraction} must be between 0 and 1 (exclusive), or null as in training.")
    if cfg.output:
        try:
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ConfigError(
                f"output={cfg.output}: its folder cannot be made ({error.strerror}); pass output= a path you can write."
            ) from error


def evaluation_text(cfg: DictConfig, data_info: dict, tokenizer: CharTokenizer, ckpt_path: Path) -> tuple:
    """The ids evaluate.py reads and what they are: all of `data.path`, or the chosen split of the corpus the
    checkpoint was trained on (`data_info`, its record), checked to be that corpus still."""
    if cfg.data.path is not None:
        source = Path(cfg.data.path).expanduser()
        if not source.is_file():
            raise DataError(f"The evaluation file {source} does not exist; pass data.path= a text file.")
        # as training read its corpus: newline="" keeps \r\n, which the model saw as \n unless it kept them
        with open(source, encoding=ENCODINGS[data_info.get("encoding", "utf-8")], newline="") as file:
            text = file.read()
        if data_info.get("newlines", "keep") == "normalize":
            text = text.replace("\r\n", "\n")
        ids = tokenizer.encode(text)
        split = f"all of {source}"
    else:
        corpus_path = data_info.get("path")
        if not corpus_path:
            raise DataError(f"{ckpt_path} does not record its training corpus; pass data.path= a text file.")
        if not Path(corpus_path).is_file():
            raise DataError(f"The training corpus {corpus_path} is not there any more; pass data.path= a text file.")
        encoding = data_info.get("encoding", "utf-8")
        # a checkpoint from before data.newlines existed read \r\n as two characters
        newlines = data_info.get("newlines", "keep")
        corpus = encode_corpus(corpus_path, PROJECT_ROOT / "data" / "cache", encoding=encoding, newlines=newlines)
        if corpus.tokenizer.vocab != tokenizer.vocab:
            raise DataError(f"{corpus_path} has changed since training (its vocabulary differs); pass data.path=.")
        split_sizes = data_info.get("split_sizes")
        val_fraction = cfg.data.val_fraction or data_info["val_fraction"]
        bounds = split_bounds(len(corpus.ids), val_fraction, split_sizes)
        if cfg.split not in bounds:
            raise DataError(
                f"The training corpus {corpus_path} has no test split (it was split into training and validation by "
                "data.val_fraction); evaluate split=val, or train with data.split_sizes=[train,val,test]."
            )
        start, end = bounds[cfg.split]
        ids = corpus.ids[start:end]
        name = {"val": "validation", "test": "test"}[cfg.split]
        where = f"characters {start}-{end}" if split_sizes else f"last {val_fraction:.0%}"
        split = f"{name} split of {corpus_path} ({where})"
    return ids, split


def report_stem(ckpt_path: Path, cfg: DictConfig, lengths: list[int]) -> Path:
    """Where evaluate.py writes its report (<stem>.eval.md, .json) beside the checkpoint: named by what was
    evaluated, so that other settings do not overwrite an earlier report. The default (the validation split at the
    training context) is <checkpoint>.eval.md; e.g. best.test.ctx256-512.past1000.eval.md names the rest."""
    parts = [ckpt_path.stem]
    if cfg.data.path is not None:
        parts.append(Path(cfg.data.path).stem)
    elif cfg.split == "test":
        parts.append("test")
    if cfg.context_lengths:
        parts.append("ctx" + "-".join(str(n) for n in lengths))
    if cfg.past_context:
        parts.append(f"past{cfg.past_context}")
    extension = cfg.model.pos_encoding
    if extension.scaling is not None:  # yarn, or yarn4 with a fixed factor
        parts.append(f"{extension.scaling}{extension.scaling_factor or ''}")
    return ckpt_path.parent / ".".join(parts)


def evaluate_checkpoint(cfg: DictConfig) -> list[dict]:
    """evaluate.py: the loss of `cfg.ckpt` on a split or file at each context length; prints the table, writes
    it with a JSON copy (<stem>.eval.md, .json) and returns the results as dicts."""
    check_evaluation_settings(cfg)
    device = resolve_device(cfg.device)
    checkpoint, ckpt_path = read_checkpoint(cfg.ckpt)
    data_info = checkpoint[CHECKPOINT_KEY].get("data", {})
    del checkpoint
    extension = OmegaConf.to_container(cfg.model.pos_encoding)
    model, tokenizer = load_model(ckpt_path, device=device, rope_scaling=extension)

    ids, split = evaluation_text(cfg, data_info, tokenizer, ckpt_path)

    lengths = cfg.context_lengths or [model.config.seq_length]
    lengths = [lengths] if isinstance(lengths, int | str) else list(lengths)  # context_lengths=512 means [512]
    if not all(is_count(n) for n in lengths):
        raise ConfigError(f"context_lengths={lengths} must be positive integers, e.g. [64,128,256,512].")
    precision, past_context = str(cfg.precision), cfg.past_context
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    dtype = torch.bfloat16 if use_bf16 else None

    print(
        f"[evaluate] {ckpt_path}: {split}, {len(ids)} characters, {'bf16' if use_bf16 else 'fp32'} on {device}",
        file=sys.stderr,
        flush=True,
    )
    # generation's ways of going on past the context, in float32; first, so a split too short fails at once
    losses = past_context_losses(model, ids, past_context, PAST_CONTEXT_STREAMS) if past_context else None
    results = []
    for n in lengths:
        if extension["scaling"] is not None and extension["scaling_factor"] is None:  # the factor n needs
            pe = model.config.pos_encoding
            original = pe.original_length or model.config.seq_length
            model.extend_context(pe.scaling, max(1.0, n / original), pe.original_length)
        results.append(evaluate(model, ids, n, cfg.data.batch_size, dtype))
        if model.config.pos_encoding.scaling is not None and results[-1].loss is not None:
            results[-1].note = positions_summary(model).split("(", 1)[1].rstrip(")")
    table = results_table(results, model.config.seq_length)
    print(table)

    if past_context:
        past_table = f"{PAST_CONTEXT_STREAMS} x {past_context} predictions past a first full context (fp32):\n\n"
        past_table += past_context_table(losses)
        print(f"\n{past_table}")
        table += f"\n\n{past_table}"

    # the test split's report beside the validation one: best.test.eval.md
    stem = Path(cfg.output) if cfg.output else report_stem(ckpt_path, cfg, lengths)
    report = {
        "checkpoint": str(ckpt_path),
        "split": split,
        "precision": "bf16" if use_bf16 else "fp32",
        "model": model.config.to_dict(),
        "results": [r.to_dict() for r in results],
    }
    if past_context:
        report["past_context"] = {"streams": PAST_CONTEXT_STREAMS, "characters": past_context, "losses": losses}
    write_eval_report(stem, report, table, f"Evaluation of `{ckpt_path}` on the {split}")
    print(f"[evaluate] wrote {stem}.eval.md and {stem}.eval.json", file=sys.stderr)
    return report["results"]


def compare_sweep(sweep_dir: Path) -> int:
    """compare.py: writes the report of the sweep in `sweep_dir` and prints its table; returns the exit status."""
    if not sweep_dir.is_dir():
        print(
            f"error: {sweep_dir} is not a directory; pass a sweep dir such as outputs/multirun/<date>.", file=sys.stderr
        )
        return 1
    if not any(sweep_dir.glob("*/.hydra/overrides.yaml")):  # a single run, or a folder of sweeps: no report here
        below = sorted(p.parent for p in sweep_dir.glob("**/multirun.yaml") if p.parent != sweep_dir)
        found = f"; the sweeps below it: {', '.join(str(p) for p in below)}" if below else ""
        print(
            f"error: {sweep_dir} holds no sweep's jobs (no <job>/.hydra/overrides.yaml), so nothing was written; "
            f"pass a sweep dir such as outputs/multirun/<date>{found}.",
            file=sys.stderr,
        )
        return 1
    written = write_sweep_report(sweep_dir)
    print(written["results.md"].read_text())
    print(f"[compare] wrote {', '.join(str(p) for p in written.values())}", file=sys.stderr)
    return 0


class WriteReport(Callback):
    """A Hydra callback: writes the sweep's report when its last job has ended (hydra.callbacks in a study)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        compare_sweep(Path(config.hydra.sweep.dir))
