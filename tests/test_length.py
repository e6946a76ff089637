"""Reading past the training length: RoPE's context extensions (against `transformers`' formulas), partial rotary,
grouped-query attention, sliding windows with attention sinks, and the encodings t5, xpos and fire, in training,
in cached decoding and in evaluate.py / generate.py on a trained checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from lm.decoding import cache_length, decode_step
from lm.errors import ConfigError
from lm.generate import NextCharacterLogits, generate
from lm.model import KVCache, Transformer, TransformerConfig
from lm.positional import ROPE_SCALINGS, T5RelativeBias, rope_frequencies, t5_buckets
from lm.tokenizer import CharTokenizer

VOCAB = "\n abcdefghij"


def model_with(pe: str | dict = "rope", dtype=torch.float64, seq_length: int = 32, **options) -> Transformer:
    torch.manual_seed(0)
    pos_encoding = {"name": pe} if isinstance(pe, str) else pe
    config = TransformerConfig(
        vocab_size=len(VOCAB),
        seq_length=seq_length,
        n_layer=2,
        n_head=4,
        n_embd=32,
        pos_encoding=pos_encoding,
        **options,
    )
    model = Transformer(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.4) if param.dim() >= 2 else param.uniform_(0.5, 1.5)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# RoPE's frequencies against transformers' modeling_rope_utils.py


def hf_frequencies(rope_type: str, dim: int, base: float, factor: float, original: int, fraction=1.0, seq_len=None):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    parameters = {"rope_type": rope_type, "factor": factor, "rope_theta": base, "partial_rotary_factor": fraction}
    if rope_type == "yarn":
        parameters["original_max_position_embeddings"] = original
    config = transformers.LlamaConfig(
        hidden_size=dim * 2, num_attention_heads=2, max_position_embeddings=original, rope_parameters=parameters
    )
    function = ROPE_INIT_FUNCTIONS[rope_type]
    return function(config, "cpu", seq_len) if rope_type == "dynamic" else function(config, "cpu")


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
@pytest.mark.parametrize("base", [10000.0, 500.0])
@pytest.mark.parametrize("factor", [2.0, 8.0])
@pytest.mark.parametrize("scaling", ["linear", "yarn", "dynamic", "ntk"])
def test_rope_scalings_match_transformers(scaling, factor, base, fraction):
    head_dim, original = 64, 128
    rotary = int(head_dim * fraction)
    if scaling == "dynamic":  # at a context of 3x the original length
        ours, our_factor = rope_frequencies(rotary, base, "dynamic", factor, original, context=3 * original)
        theirs, their_factor = hf_frequencies("dynamic", head_dim, base, factor, original, fraction, 3 * original)
    elif scaling == "ntk":  # static NTK by s is dynamic NTK (its factor 1) at a context of s x the original length
        ours, our_factor = rope_frequencies(rotary, base, "ntk", factor, original)
        theirs, their_factor = hf_frequencies(
            "dynamic", head_dim, base, 1.0, original, fraction, int(factor * original)
        )
    else:
        ours, our_factor = rope_frequencies(rotary, base, scaling, factor, original)
        theirs, their_factor = hf_frequencies(scaling, head_dim, base, factor, original, fraction)
    assert ours.shape == theirs.shape == (rotary // 2,)
    torch.testing.assert_close(ours.float(), theirs.float(), rtol=1e-5, atol=0)
    assert our_factor == pytest.approx(their_factor)


def test_dynamic_ntk_changes_nothing_within_the_original_length():
    plain, _ = rope_frequencies(32, 10000.0)
    within, _ = rope_frequencies(32, 10000.0, "dynamic", 4.0, 128, context=128)
    assert torch.equal(plain, within)


@pytest.mark.parametrize("scaling", ROPE_SCALINGS)
def test_a_scaling_factor_of_one_leaves_the_output_unchanged(scaling):
    model = model_with()
    idx = torch.randint(0, len(VOCAB), (2, 64))  # past the training length, where dynamic would act
    with torch.no_grad():
        before = model(idx)
        model.extend_context(scaling, 1.0)
        assert torch.equal(model(idx), before)


def test_extending_the_context_changes_only_the_rotation():
    model = model_with()
    idx = torch.randint(0, len(VOCAB), (2, 64))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(idx)
        model.extend_context("yarn", 4.0)
        after = model(idx)
    assert not torch.allclose(before, after)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.rope.attention_factor == pytest.approx(0.1 * math.log(4) + 1)


def test_partial_rotary_leaves_the_other_channels_alone():
    model = model_with({"name": "rope", "rotary_fraction": 0.25})  # head size 8: 2 channels rotate
    cos, sin = model.rope.tables(0, 40)
    rotating = torch.zeros(8, dtype=torch.bool)
    rotating[[0, 4]] = True  # pair (0, 4) in the rotate-half layout
    assert torch.all(cos[:, ~rotating] == 1) and torch.all(sin[:, ~rotating] == 0)
    assert not torch.all(cos[1:, rotating] == 1)


def test_t5_buckets_are_exact_then_logarithmic():
    distance = torch.arange(0, 300)
    buckets = t5_buckets(distance, 32, 128)
    assert torch.equal(buckets[:16], torch.arange(16))
    assert torch.all(buckets.diff() >= 0) and buckets[100] < 31 and torch.all(buckets[120:] == 31)
    assert T5RelativeBias(4).bias(torch.arange(3), torch.arange(3), torch.float32)[:, 0, 1:].isinf().all()


# --------------------------------------------------------------------------------------------------------------
# attention's options: a plain reference, and the cache


def reference_attention_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The model with grouped-query attention and a window written out plainly: repeated key/value heads, a
    boolean mask of what each query sees (the block's own norms and MLP, whose equivalence tests/test_techniques.py
    checks, in the order its options put them)."""
    config = model.config
    B, T = idx.shape
    H, H_kv, D = config.n_head, config.kv_heads, config.head_dim
    positions = torch.arange(T)
    distance = positions[:, None] - positions[None, :]
    visible = distance >= 0
    if config.attention_window is not None:
        visible &= (distance < config.attention_window) | (positions[None, :] < config.attention_sinks)
    x = model.token_embedding(idx)
    if model.position is not None:
        x = x + model.position(0, T)

    def attention(attn, h):
        q, k, v = attn.qkv(h).split([H * D, H_kv * D, H_kv * D], -1)
        q, k, v = q.view(B, T, H, D), k.view(B, T, H_kv, D), v.view(B, T, H_kv, D)
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        if model.rope is not None:
            q, k = model.rope.rotate_qk(q, k, 0)
        k, v = k.repeat_interleave(H // H_kv, dim=2), v.repeat_interleave(H // H_kv, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        if model.relative_bias is not None:
            scores = scores + model.relative_bias.bias(positions, positions, scores.dtype).nan_to_num(neginf=0)
        scores = scores.masked_fill(~visible, -math.inf)
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, -1)
        return attn.proj(y)

    for block in model.blocks:
        if block.post_norm:
            x = block.ln_1(x + attention(block.attn, x))
            x = block.ln_2(x + block.mlp(x))
        else:
            x = x + attention(block.attn, block.ln_1(x))
            x = x + block.mlp(block.ln_2(x))
    return model.cap_logits(model.head(model.ln_f(x)))


ENCODINGS = ["rope", "xpos", "alibi", "t5", "fire", "learned", "none"]
ATTENTION = {
    "gqa2": dict(n_kv_head=2),
    "mqa": dict(n_kv_head=1),
    "window": dict(attention_window=5),
    "window_sinks_gqa": dict(attention_window=5, attention_sinks=2, n_kv_head=2),
}


BLOCKS = {  # the block's techniques (docs/configuration.md), two recipes that use them all
    "gpt2": {},
    "modern": dict(norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=30.0),
    "post_swiglu": dict(norm_position="post", mlp="swiglu"),
}


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("option", ATTENTION)
@pytest.mark.parametrize("pe", ENCODINGS)
def test_attention_options_match_the_plain_reference_in_values_and_gradients(pe, option, block):
    """float64: the CPU block kernel; float32 (below) takes the fused kernel where it can."""
    model = model_with(pe, **ATTENTION[option], **BLOCKS[block]).train()
    idx = torch.randint(0, len(VOCAB), (3, 20))
    fast = model(idx)
    grads = torch.autograd.grad(fast.square().sum(), list(model.parameters()), allow_unused=True)
    plain = reference_attention_logits(model, idx)
    plain_grads = torch.autograd.grad(plain.square().sum(), list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(fast, plain, atol=1e-10, rtol=0)
    for (name, _), grad, plain_grad in zip(model.named_parameters(), grads, plain_grads, strict=True):
        if plain_grad is None:
            assert grad is None or not grad.any(), name
        else:
            torch.testing.assert_close(grad, plain_grad, atol=1e-9, rtol=0, msg=name)


@pytest.mark.parametrize("option", ["gqa2", "window_sinks_gqa"])
@pytest.mark.parametrize("pe", ["rope", "alibi", "t5"])
def test_attention_options_in_float32_and_bf16_match_float64(pe, option):
    model = model_with(pe, **ATTENTION[option])
    idx = torch.randint(0, len(VOCAB), (2, 20))
    with torch.no_grad():
        exact = model(idx)
        model.float()
        torch.testing.assert_close(model(idx).double(), exact, atol=1e-4, rtol=0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert (model(idx).double() - exact).abs().max() < 0.25


def test_one_kv_head_per_query_head_is_the_model_of_today():
    default = model_with("rope")
    explicit = model_with("rope", n_kv_head=4)
    assert default.state_dict().keys() == explicit.state_dict().keys()
    explicit.load_state_dict(default.state_dict())
    idx = torch.randint(0, len(VOCAB), (2, 20))
    with torch.no_grad():
        assert torch.equal(default(idx), explicit(idx))


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("option", [{}, *ATTENTION.values()])
@pytest.mark.parametrize("pe", ENCODINGS)
def test_decoding_steps_equal_the_full_forward(pe, option, block):
    """Prefill, then one position at a time: every step's logits equal the uncached forward's at that position."""
    model = model_with(pe, **option, **BLOCKS[block])
    idx = torch.randint(0, len(VOCAB), (2, 24))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 2, 32, "cpu", torch.float64)
        prefill = model(idx[:, :6], cache)
        torch.testing.assert_close(prefill, full[:, :6], atol=1e-10, rtol=0)
        for t in range(6, 24):
            logits = decode_step(model, idx[:, t], cache.positions[t], cache)
            cache.length += 1
            torch.testing.assert_close(logits, full[:, t], atol=1e-10, rtol=0)


@pytest.mark.parametrize("pe", ["rope", "alibi", "t5"])
def test_a_windowed_cache_keeps_sinks_and_window_in_fixed_memory_and_stays_exact(pe):
    """A cache of sinks + window slots (6) slides over 30 positions, rewinding twice, and each step equals the
    full forward, whose window and sinks see the same keys."""
    model = model_with(pe, seq_length=32, attention_window=4, attention_sinks=2, n_kv_head=2)
    assert cache_length(model) == 6
    idx = torch.randint(0, len(VOCAB), (2, 30))
    with torch.no_grad():
        full = model(idx)
        logits = NextCharacterLogits(model, 2)
        for t in range(9, 30):  # a 9-character prompt fills more than the cache: only sinks and window are kept
            # RoPE's rewound keys: a rotation back by the ring's length, from fp32 tables
            torch.testing.assert_close(logits(idx, t), full[:, t - 1], atol=1e-6 if pe == "rope" else 1e-9, rtol=0)
        cache = logits.cache
    assert cache.max_length == 6 and cache.kv[0].shape == (2, 2, 2, 6, 8)  # (k/v, batch, kv heads, slots, head)


@pytest.mark.parametrize("option", [{}, *ATTENTION.values()])
@pytest.mark.parametrize("pe", ENCODINGS)
def test_cached_greedy_text_equals_uncached(pe, option):
    model = model_with(pe, dtype=torch.float32, **option)
    tok = CharTokenizer(VOCAB)
    texts = [generate(model, tok, "abc", 25, temperature=0, kv_cache=kv, exact=True)[0] for kv in (True, False)]
    assert texts[0] == texts[1]


def test_gqa_caches_only_the_key_value_heads():
    full, mqa = model_with("rope"), model_with("rope", n_kv_head=1)
    sizes = [KVCache(m.config, 1, 32, "cpu", torch.float32).memory_bytes() for m in (full, mqa)]
    assert sizes[0] == 4 * sizes[1]


def test_scaled_rope_decodes_as_it_evaluates():
    model = model_with({"name": "rope", "scaling": "yarn", "scaling_factor": 4.0, "rotary_fraction": 0.5})
    idx = torch.randint(0, len(VOCAB), (1, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.config, 1, 32, "cpu", torch.float64)
        model(idx[:, :5], cache)
        for t in range(5, 20):
            torch.testing.assert_close(decode_step(model, idx[:, t], cache.positions[t], cache), full[:, t])
            cache.length += 1


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(n_kv_head=3), "n_kv_head"),
        (dict(n_kv_head=0), "n_kv_head"),
        (dict(attention_window=0), "attention_window"),
        (dict(attention_sinks=2), "attention_sinks"),
        (dict(attention_window=4, attention_sinks=-1), "attention_sinks"),
        (dict(pos_encoding={"name": "rope", "rotary_fraction": 0.1}), "rotary_fraction"),
        (dict(pos_encoding={"name": "rope", "rotary_fraction": 1.5}), "rotary_fraction"),
        (dict(pos_encoding={"name": "rope", "scaling": "ntk-by-parts"}), "scaling"),
        (dict(pos_encoding={"name": "rope", "scaling": "yarn", "scaling_factor": 0.5}), "scaling_factor"),
        (dict(pos_encoding={"name": "alibi", "scaling": "yarn"}), "pos_encoding=rope"),
        (dict(pos_encoding={"name": "rope", "original_length": 0}), "original_length"),
    ],
)
def test_bad_length_settings_get_one_clear_error(settings, match):
    with pytest.raises(ConfigError, match=match):
        TransformerConfig(vocab_size=10, n_head=4, n_embd=32, **settings)


def test_extending_a_model_without_rope_is_refused():
    with pytest.raises(ConfigError, match="uses alibi positions"):
        model_with("alibi").extend_context("yarn", 2.0)


# --------------------------------------------------------------------------------------------------------------
# The commands: train, resume, evaluate and generate with the options, a context extension on a checkpoint


def test_a_gqa_windowed_rope_run_trains_resumes_and_takes_a_context_extension_at_evaluation(tmp_path, corpus, cli):
    import json

    from helpers import only_run

    common = [f"data.path={corpus}", "model=tiny", "data.seq_length=32", "data.batch_size=8", "logger=csv"]
    common += ["callbacks.text_sample.max_new_tokens=0", "trainer.val_check_interval=10", "trainer.precision=32-true"]
    common += ["model.n_kv_head=1", "model.attention_window=16", "model.attention_sinks=2"]
    common += ["model.pos_encoding.rotary_fraction=0.5"]
    cli.train([*common, "trainer.max_steps=20"], tmp_path)
    run = only_run(tmp_path / "outputs")
    cli.train([*common, "trainer.max_steps=30", f"resume={run}"], tmp_path)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 30
    ckpt = run / "checkpoints" / "last.ckpt"
    plain = cli.script("evaluate.py", f"ckpt={ckpt}", "precision=32", "context_lengths=[32,64,128]")
    assert "| 32 |" in plain.stdout and "yarn" not in plain.stdout
    yarn = cli.script(
        "evaluate.py", f"ckpt={ckpt}", "precision=32", "context_lengths=[32,64,128]", "model.pos_encoding.scaling=yarn"
    )
    report = json.loads((run / "checkpoints" / "last.ctx32-64-128.yarn.eval.json").read_text())
    rows = {r["context_length"]: r for r in report["results"]}
    assert [rows[n]["note"] for n in (32, 64, 128)] == ["yarn x1 of 32", "yarn x2 of 32", "yarn x4 of 32"]
    # a factor of 1 leaves the model as trained; the training length reads the same either way
    assert rows[32]["loss"] == pytest.approx(summary["metrics"]["val/loss"], abs=1e-4)
    assert "| 128 |" in yarn.stdout
    fixed = cli.script(
        "evaluate.py",
        f"ckpt={ckpt}",
        "precision=32",
        "context_lengths=128",
        "model.pos_encoding.scaling=linear",
        "model.pos_encoding.scaling_factor=4",
    )
    assert "linear x4 of 32" in fixed.stdout and (run / "checkpoints" / "last.ctx128.linear4.eval.md").exists()
    text = cli.script(
        "generate.py", f"ckpt={run}", "prompt=ab", "max_new_tokens=100", "seed=0", "model.pos_encoding.scaling=ntk"
    )
    assert "rope positions (ntk x1 of 32)" in text.stderr and len(text.stdout.rstrip("\n")) >= 100
    for refused in ("model.pos_encoding.rotary_fraction=1.0", "model.n_kv_head=2", "+model.pos_encoding.scaling=yarn"):
        result = cli.script("evaluate.py", f"ckpt={ckpt}", refused, check=False)
        assert result.returncode == 1 and "come from its checkpoint" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    # fine-tuning at twice the length with Position Interpolation: a new run from the weights, its own optimizer
    longer = [a for a in common if not a.startswith("data.seq_length")] + ["data.seq_length=64"]
    longer += ["model.pos_encoding.scaling=linear", "model.pos_encoding.scaling_factor=2"]
    longer += ["model.pos_encoding.original_length=32", "trainer.max_steps=6", f"init_from={run}"]
    finetune_dir = tmp_path / "finetune"
    result = cli.train([*longer, "final_eval.context_multiples=[1,2]", "final_eval.base_length=32"], finetune_dir)
    assert f"starting from the weights of {run / 'checkpoints' / 'best.ckpt'} (step" in result.stderr
    tuned = only_run(finetune_dir / "outputs")
    saved = torch.load(tuned / "checkpoints" / "last.ckpt", weights_only=True)["transformer_lm"]["model_config"]
    assert saved["seq_length"] == 64 and saved["pos_encoding"]["scaling"] == "linear"
    tuned_summary = json.loads((tuned / "summary.json").read_text())
    assert tuned_summary["global_step"] == 6 and tuned_summary["eval_base_length"] == 32
    assert [r["context_length"] for r in tuned_summary["evaluations"]] == [32, 64]
    # what shapes the weights must match, as for ckpt_path=
    refused = cli.train([*longer, "model.n_kv_head=2"], tmp_path / "refused", check=False)
    assert refused.returncode == 1 and "the checkpoint's model has model.n_kv_head=1" in refused.stderr


def test_a_context_extension_on_a_checkpoint_without_rope_is_one_clear_error(tmp_path, corpus, cli):
    from helpers import only_run

    common = [f"data.path={corpus}", "model=tiny", "data.seq_length=32", "data.batch_size=8", "logger=csv"]
    cli.train([*common, "pos_encoding=t5", "trainer.max_steps=4", "callbacks.text_sample.max_new_tokens=0"], tmp_path)
    run = only_run(tmp_path / "outputs")
    result = cli.script("evaluate.py", f"ckpt={run}", "model.pos_encoding.scaling=yarn", check=False)
    assert result.returncode == 1 and "uses t5 positions" in result.stderr
    assert not list((run / "checkpoints").glob("*.eval.md"))


def test_a_compiled_step_slides_a_windowed_gqa_cache_as_the_eager_one():
    """The compiled step attends over the whole cache under a mask built from each slot's position: past the
    sinks and window, through the ring's rewinds, it writes the eager step's text."""
    model = model_with("rope", dtype=torch.float32, attention_window=6, attention_sinks=2, n_kv_head=2)
    tok = CharTokenizer(VOCAB)
    kwargs = dict(prompt="abc", max_new_tokens=40, temperature=0, exact=True)
    assert generate(model, tok, compile=True, **kwargs) == generate(model, tok, **kwargs)


def test_init_from_refuses_to_go_with_resume_or_ckpt_path(tmp_path, corpus, cli):
    common = [f"data.path={corpus}", "model=tiny", "data.seq_length=32", "trainer.max_steps=2"]
    result = cli.train([*common, f"init_from={tmp_path}", f"ckpt_path={tmp_path}/x.ckpt"], tmp_path, check=False)
    assert result.returncode == 1 and "init_from= starts a new run" in result.stderr
    result = cli.train([*common, f"init_from={tmp_path}/missing.ckpt"], tmp_path, check=False)
    assert result.returncode == 1 and "pass init_from= a .ckpt file or a run directory" in result.stderr
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


@pytest.mark.parametrize("option", ATTENTION)
@pytest.mark.parametrize("pe", ENCODINGS)
def test_both_cpu_attention_paths_agree(pe, option, monkeypatch):
    """Contexts past the CPU kernels' limit (long evaluations) take PyTorch's fused attention with the same mask and
    rotation: the two paths give the same logits."""
    import lm.model

    model = model_with(pe, **ATTENTION[option])
    idx = torch.randint(0, len(VOCAB), (2, 20))
    with torch.no_grad():
        kernels = model(idx)
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", 0)
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 0)
        fused = model(idx)
    torch.testing.assert_close(fused, kernels, atol=1e-10, rtol=0)
