"""Sampling text from a trained `Transformer`, incrementally with a KV cache or by recomputing the context."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from lm.decoding import cache_length, decode_step, decoding_matrices, rewind_cache, sliding_cache
from lm.errors import ConfigError, is_count, is_number
from lm.model import KVCache, Transformer, decoding_positions
from lm.tokenizer import CharTokenizer


def check_sampling_args(
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None = None,
    num_samples: int = 1,
) -> None:
    """Rejects sampling settings that make no sense, with one sentence each."""
    if not is_count(max_new_tokens, minimum=0):
        raise ConfigError(f"max_new_tokens={max_new_tokens} must be a non-negative integer.")
    if not is_number(temperature) or temperature < 0:
        raise ConfigError(f"temperature={temperature} must be a number >= 0 (0 means greedy decoding).")
    if top_k is not None and not is_count(top_k):
        raise ConfigError(f"top_k={top_k} must be a positive integer, or null to disable it.")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p} must be in (0, 1], or null to disable it.")
    if seed is not None and (not is_count(seed, minimum=0) or seed >= 2**63):
        raise ConfigError(f"seed={seed} must be a non-negative integer, or null for a random one.")
    if not is_count(num_samples):
        raise ConfigError(f"num_samples={num_samples} must be at least 1.")


def check_switches(**switches) -> None:
    """Rejects an on/off setting (kv_cache=, compile=, exact=) that is not a boolean: `kv_cache=maybe` or
    `kv_cache=0` would otherwise run in some mode the user cannot tell."""
    for name, value in switches.items():
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value} must be true or false.")


# weights read per decoding step (parameters x streams) for each CPU thread: below this, more threads cost more in
# synchronisation than they give, and far more when another process shares the cores (docs/generation.md)
WEIGHTS_PER_DECODING_THREAD = 32_000_000


def decoding_threads(model: Transformer, num_samples: int = 1) -> int:
    """How many CPU threads decoding uses: one per `WEIGHTS_PER_DECODING_THREAD` weights that a step reads (the
    model's parameters times the streams), at least one and at most torch's current thread count."""
    work = model.num_parameters() * num_samples
    return max(1, min(torch.get_num_threads(), work // WEIGHTS_PER_DECODING_THREAD))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Picks one id per row of `logits` (B, V): greedy at temperature 0, else top-k / nucleus sampling, drawing
    with `uniform` (B, 1) in [0, 1) when given."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    if temperature != 1.0:
        logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p; the top token always stays
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    # inverse-CDF sampling: the same distribution as torch.multinomial, at a fraction of its per-call cost
    cdf = logits.softmax(dim=-1).cumsum(dim=-1)
    if uniform is None:
        uniform = torch.rand(cdf.shape[0], 1, device=cdf.device, generator=generator)
    u = uniform * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.shape[-1] - 1)


def default_prompt(tokenizer: CharTokenizer) -> str:
    """Where text starts when no prompt is given: a newline, or the vocabulary's first character if it has none."""
    return "\n" if "\n" in tokenizer.vocab else tokenizer.vocab[0]


def prepared_decode_step(model: Transformer, compile: bool = False) -> Callable:
    """`decode_step` for `model`, compiled once per model when asked (the compiled function is kept on the model).

    On CUDA the compiled step is captured as a CUDA graph (`mode="reduce-overhead"`): a one-character step is a few
    dozen small kernels, whose launches, not their arithmetic, set its pace. Its shapes do not depend on the
    position and the cache's tensors keep their addresses (`KVCache` marks them static), so one graph replays at
    every step."""
    if model.rope is not None:  # built outside the compiled region
        slots = cache_length(model)
        model.rope.decoding_rotations(decoding_positions(slots), model.token_embedding.weight.dtype, slots)
    step = functools.partial(decode_step, model)
    if not compile:
        return step
    if getattr(model, "_compiled_decode_step", None) is None:
        on_cuda = model.token_embedding.weight.is_cuda
        model._compiled_decode_step = torch.compile(
            step, dynamic=False, fullgraph=True, mode="reduce-overhead" if on_cuda else None
        )
    return model._compiled_decode_step


class NextCharacterLogits:
    """Logits for the next character of `batch` texts that grow one character at a time: the context handling
    behind `generate`, without sampling.

    With `kv_cache`, the first call fills the cache from the text so far (up to a full context) and each later
    call costs one position (`step`: `decode_step` or its compiled version). Past the context, a cache that
    can slide (`sliding_cache`, unless `sliding=False`) keeps the most recent `seq_length` positions;
    otherwise it is rebuilt from the most recent half context, so rebuilds stay rare. Without the cache, each call
    recomputes the last `seq_length` characters.
    """

    def __init__(
        self,
        model: Transformer,
        batch: int,
        kv_cache: bool = True,
        step: Callable | None = None,
        matrices: dict | None = None,
        sliding: bool | None = None,
    ):
        self.model, self.batch, self.kv_cache, self.matrices = model, batch, kv_cache, matrices
        self.step = step or functools.partial(decode_step, model)
        self.sliding = sliding_cache(model) if sliding is None else sliding and sliding_cache(model)
        self.cache: KVCache | None = None
        self.newest: torch.Tensor | None = None  # the newest character of each text, for the step

    def __call__(self, tokens: torch.Tensor, length: int) -> torch.Tensor:
        """Logits (batch, vocab) for the character after `tokens[:, :length]`; after the first call, each call's
        text is the previous one's plus one character."""
        model, context_length, cache = self.model, self.model.config.seq_length, self.cache
        if not self.kv_cache:
            return model(tokens[:, max(0, length - context_length) : length])[:, -1]
        if cache is None or (cache.length >= cache.max_length and not self.sliding):
            # a full cache that cannot slide is rebuilt from the most recent half context (a longer prompt likewise)
            keep = context_length // 2
            if cache is None and (length <= context_length or self.sliding):
                keep = min(length, context_length)
            dtype, device = model.token_embedding.weight.dtype, tokens.device
            slots = cache_length(model) if self.sliding else context_length  # a windowed model's: its window
            self.cache = KVCache(model.config, self.batch, slots, device, dtype, self.matrices)
            # the step reads the newest characters from a buffer of its own: a column of `tokens` would have strides
            # that depend on the text's length, and a compiled step would be recompiled for each length
            self.newest = torch.empty(self.batch, dtype=torch.long, device=device)
            return model(tokens[:, length - keep : length], self.cache)[:, -1]
        if cache.length == decoding_positions(cache.max_length):
            rewind_cache(model, cache)
        logits = self.step(self.newest.copy_(tokens[:, length - 1]), cache.positions[cache.length], cache)
        cache.length += 1
        return logits


@torch.inference_mode()  # lighter than no_grad: no version counters, which one-character steps feel
def generate(
    model: Transformer,
    tokenizer: CharTokenizer,
    prompt: str,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    num_samples: int = 1,
    seed: int | None = None,
    kv_cache: bool = True,
    on_token: Callable[[torch.Tensor], None] | None = None,
    compile: bool = False,
    exact: bool = False,
    threads: int | None = None,
) -> list[str]:
    """Continues `prompt` `num_samples` times and returns the prompts with their continuations.

    With `kv_cache`, each new character costs one position's worth of compute. When the text outgrows the
    model's context, generation goes on: with RoPE, ALiBi or T5's bias the cache slides (each character attends to
    the last `seq_length`, or the sinks and the window of a windowed model, their keys and values as computed when
    they were new: `sliding_cache`); with the other encodings it is rebuilt from the most recent half context.
    Without the cache, every step recomputes the last `seq_length` characters. `on_token` receives each new
    batch of ids (shape (num_samples,)) as it is made, for streaming. `compile` runs the one-character step through
    `torch.compile` (its shapes do not depend on the position, so it compiles once per model and batch size). An
    empty prompt starts from a newline, or from the vocabulary's first character when the corpus had no newline.

    On a CPU, up to 16 streams multiply by float16 versions of the weights (`lm.decoding.decoding_matrices`: more
    characters/s than `exact=True`, logits within float16's rounding); `exact=True` keeps every product in the
    model's precision. On a CPU, decoding runs on `threads` threads (None: `decoding_threads`, by the model's size),
    and torch's thread count is put back afterwards.
    """
    check_sampling_args(max_new_tokens, temperature, top_k, top_p, seed, num_samples)
    if threads is not None and not is_count(threads):
        raise ConfigError(f"threads={threads} must be a positive integer, or auto (by the model's size).")
    check_switches(kv_cache=kv_cache, compile=compile, exact=exact)
    if not isinstance(prompt, str):
        raise ConfigError(
            f"prompt must be one string, not a {type(prompt).__name__}; for several continuations of one prompt pass "
            "num_samples=, and call generate once per prompt for several prompts."
        )
    prompt = prompt or default_prompt(tokenizer)
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    prompt_ids = torch.from_numpy(tokenizer.encode(prompt).astype("int64")).to(device)
    # one buffer for the whole text: tokens[:, :length] is what exists so far
    tokens = torch.empty(num_samples, len(prompt_ids) + max_new_tokens, dtype=torch.long, device=device)
    tokens[:, : len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)
    # uniforms for inverse-CDF sampling, drawn at once: one operation less per character
    uniforms = torch.rand(max_new_tokens, num_samples, 1, device=device, generator=generator)
    was_training, threads_before = model.training, torch.get_num_threads()
    model.eval()
    try:
        if device.type == "cpu":
            torch.set_num_threads(threads or decoding_threads(model, num_samples))
        step = prepared_decode_step(model, compile) if kv_cache else None
        matrices = decoding_matrices(model, num_samples, compile) if kv_cache and not exact else None
        logits_for_next = NextCharacterLogits(model, num_samples, kv_cache, step, matrices)
        for i in range(max_new_tokens):
            next_ids = sample_next(logits_for_next(tokens, length), temperature, top_k, top_p, generator, uniforms[i])
            tokens[:, length] = next_ids[:, 0]
            length += 1
            if on_token is not None:
                on_token(next_ids[:, 0])
    finally:
        model.train(was_training)
        torch.set_num_threads(threads_before)
    return [tokenizer.decode(row) for row in tokens.cpu()]
