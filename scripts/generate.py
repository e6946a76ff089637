"""Sample text from a trained checkpoint, streaming characters to stdout as they are made.

    python scripts/generate.py ckpt=outputs/runs/<run>/ prompt="KING: Oh God !" max_new_tokens=200
    python scripts/generate.py ckpt=path/to/best.ckpt temperature=0 kv_cache=false

stdout carries the text alone; diagnostics go to stderr.
"""

from __future__ import annotations

import re
import sys
import time

import hydra
import torch
from _common import CONFIG_DIR, report_errors, resolve_device
from omegaconf import DictConfig

from lm.checkpoint import load_model
from lm.generate import check_sampling_args, default_prompt, generate


def quote_prompt_argument(argv: list[str]) -> list[str]:
    """Quotes `prompt=...` for Hydra, so prompts with characters its override grammar reserves ('!', ',', ...)
    work exactly as typed: prompt="KING: Oh God !"."""

    def quote(arg: str) -> str:
        key, _, value = arg.partition("=")
        if key.lstrip("+") != "prompt" or value[:1] in ("'", '"'):
            return arg
        value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
        value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
        return f"{key}='{value}'"

    return [quote(a) for a in argv]


@report_errors
def run(cfg: DictConfig) -> None:
    check_sampling_args(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p, cfg.seed, cfg.num_samples)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model(cfg.ckpt, device=device)
    print(
        f"[generate] {model.config.n_layer} layers x {model.config.n_embd}, "
        f"{model.config.pos_encoding.name} positions, context {model.config.seq_length}, on {device}, "
        f"kv_cache={cfg.kv_cache}, compile={cfg.compile}, exact={cfg.exact}",
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


@hydra.main(config_path=CONFIG_DIR, config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv = quote_prompt_argument(sys.argv)
    main()
