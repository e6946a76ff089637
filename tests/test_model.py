import math

import pytest
import torch
import torch.nn.functional as F

from lm.errors import ConfigError
from lm.kernels import BlockCausalAttention, RotaryHeads
from lm.model import (
    POSITIONAL_ENCODINGS,
    ContextTooLongError,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    Transformer,
    TransformerConfig,
)
from lm.positional import ALiBi, alibi_slopes


def tiny_config(pe: str = "rope", **kw) -> TransformerConfig:
    base = dict(vocab_size=11, seq_length=16, n_layer=2, n_head=2, n_embd=16, pos_encoding={"name": pe})
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_logits_shape_and_tied_head(pe):
    torch.manual_seed(0)
    model = Transformer(tiny_config(pe))
    logits = model(torch.randint(0, 11, (3, 16)))
    assert logits.shape == (3, 16, 11)
    assert model.head.weight is model.token_embedding.weight


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize("length", [12, 300])  # 300 > 256 exercises the fused attention kernel
def test_causality_future_tokens_do_not_change_past_logits(pe, length):
    torch.manual_seed(0)
    model = Transformer(tiny_config(pe, seq_length=length)).eval()
    idx = torch.randint(0, 11, (2, length))
    t = length // 2
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 11, (2, length - t - 1))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-5)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :], atol=1e-5)


@pytest.mark.parametrize("length,block", [(20, 64), (64, 16), (70, 16), (1, 8)])
def test_block_causal_attention_matches_fused_kernel_values_and_gradients(length, block):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, length, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, length, 8, dtype=torch.float64)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    flat = [t.reshape(6, length, 8) for t in (q, k, v)]
    y = BlockCausalAttention.apply(*flat, 0.0, block).view(2, 3, length, 8)
    assert torch.allclose(y, expected, atol=1e-12)
    for got, want in zip(torch.autograd.grad(y, (q, k, v), grad), expected_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-12)


def test_block_causal_attention_dropout_gradients_and_expectation():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 40, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))

    def attend(a, b, c):
        torch.manual_seed(5)  # the same dropout mask on every call
        return BlockCausalAttention.apply(a, b, c, 0.25, 16)

    assert torch.autograd.gradcheck(attend, (q, k, v))
    # averaged over masks, inverted dropout leaves the output unchanged
    no_dropout = BlockCausalAttention.apply(q, k, v, 0.0, 16)
    mean = sum(BlockCausalAttention.apply(q, k, v, 0.25, 16) for _ in range(400)) / 400
    assert (mean - no_dropout).abs().mean().item() < 0.02
    assert not torch.equal(BlockCausalAttention.apply(q, k, v, 0.25, 16), no_dropout)


def test_block_causal_attention_in_bf16_under_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 70, 16) for _ in range(3))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = BlockCausalAttention.apply(*(t.bfloat16().view(6, 70, 16) for t in (q, k, v)), 0.0, 64)
    assert y.dtype == torch.bfloat16
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (y.float().view(2, 3, 70, 16) - expected).abs().max().item() < 0.05


def test_rotary_heads_matches_rope_and_reshape_values_and_gradients():
    torch.manual_seed(0)
    B, T, H, D = 2, 9, 3, 8
    rope = RotaryEmbedding(D, initial_length=4).double()
    qkv = torch.randn(B, T, 3, H, D, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(B * H, T, D, dtype=torch.float64) for _ in range(3)]
    qk = rope(qkv[:, :, :2], seq_dim=1)
    expected = [t.transpose(1, 2).reshape(B * H, T, D) for t in (qk[:, :, 0], qk[:, :, 1], qkv[:, :, 2])]
    (expected_grad,) = torch.autograd.grad(expected, qkv, grads)
    got = RotaryHeads.apply(qkv, *rope.tables(0, T))
    for a, b in zip(got, expected, strict=True):
        assert a.is_contiguous() and torch.allclose(a, b, atol=1e-12)
    (got_grad,) = torch.autograd.grad(got, qkv, grads)
    assert torch.allclose(got_grad, expected_grad, atol=1e-12)


def test_rotary_heads_in_bf16_rounds_the_exact_rotation_once():
    # bf16 rotations run in fp32 and round once: each output within half a bf16 step of the exact value
    torch.manual_seed(0)
    B, T, H, D = 2, 40, 3, 32
    rope = RotaryEmbedding(D, initial_length=T)
    qkv = torch.randn(B, T, 3, H, D).bfloat16()
    grads = [torch.randn(B * H, T, D).bfloat16() for _ in range(3)]
    cos, sin = rope.tables(0, T)
    wide = qkv.double().requires_grad_()
    exact = RotaryHeads.apply(wide, cos.double(), sin.double())
    (exact_grad,) = torch.autograd.grad(exact, wide, [g.double() for g in grads])
    narrow = qkv.clone().requires_grad_()
    got = RotaryHeads.apply(narrow, cos, sin)
    (got_grad,) = torch.autograd.grad(got, narrow, grads)
    for a, b in [*zip(got, exact, strict=True), (got_grad, exact_grad)]:
        assert a.dtype == torch.bfloat16
        half_step = torch.ldexp(torch.ones_like(b), torch.frexp(b).exponent - 9)  # bf16 keeps 8 significant bits
        assert ((a.double() - b).abs() <= half_step + 1e-6).all()  # + fp32 rounding where terms cancel


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_cpu_kernels_give_the_model_the_same_logits_and_gradients_as_plain_pytorch(pe, monkeypatch):
    import lm.model

    torch.manual_seed(0)
    model = Transformer(tiny_config(pe)).double()
    idx = torch.randint(0, 11, (3, 16))

    def logits_and_grads():
        model.zero_grad()
        logits = model(idx)
        logits.square().sum().backward()
        return logits, [p.grad.clone() for p in model.parameters()]

    fast, fast_grads = logits_and_grads()
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", 0)  # SDPA for every length
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 0)
    plain, plain_grads = logits_and_grads()
    assert torch.allclose(fast, plain, atol=1e-10)
    for a, b in zip(fast_grads, plain_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("pe", ["rope", "learned"])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_fp32_attention_takes_the_flash_kernel_without_dropout_and_the_block_kernel_with_it(pe, dropout, monkeypatch):
    import lm.model

    torch.manual_seed(0)
    model = Transformer(tiny_config(pe, dropout=dropout))
    idx = torch.randint(0, 11, (3, 16))
    calls = []
    block_kernel = lm.model.BlockCausalAttention.apply
    monkeypatch.setattr(lm.model.BlockCausalAttention, "apply", lambda *a: calls.append(1) or block_kernel(*a))
    (fast_grad,) = torch.autograd.grad(model(idx).square().sum(), model.blocks[0].attn.qkv.weight)
    assert len(calls) == (2 if dropout else 0)  # one per layer with dropout, none without
    model.eval()  # evaluation has no dropout: the flash kernel, whatever the model's dropout
    model(idx)
    assert len(calls) == (2 if dropout else 0)
    if dropout == 0:  # what rope() (if any) + SDPA give
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", 0)
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 0)
        model.train()
        (plain_grad,) = torch.autograd.grad(model(idx).square().sum(), model.blocks[0].attn.qkv.weight)
        assert torch.allclose(fast_grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_rope_preserves_norms_and_scores_depend_only_on_offset():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=8, base=10000.0, initial_length=4)
    x = torch.randn(1, 1, 50, 8)
    rotated = rope(x)  # also grows the cos/sin cache past its initial length
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> float:
        qm = rope(q.view(1, 1, 1, 8), start=m)
        kn = rope(k.view(1, 1, 1, 8), start=n)
        return float((qm * kn).sum())

    assert score(3, 1) == pytest.approx(score(12, 10), abs=1e-4)
    assert score(20, 5) == pytest.approx(score(35, 20), abs=1e-4)
    assert score(3, 1) != pytest.approx(score(4, 1), abs=1e-4)
    assert rope(x[:, :, 10:20], start=10).allclose(rotated[:, :, 10:20], atol=1e-6)


def test_rope_base_changes_the_rotation():
    x = torch.randn(1, 1, 10, 8)
    assert not torch.allclose(RotaryEmbedding(8, 10000.0)(x), RotaryEmbedding(8, 500.0)(x))


def test_sinusoidal_matches_its_formula():
    dim = 6
    pe = SinusoidalPositionalEncoding(dim, initial_length=4)
    table = pe(0, 40)  # grows on demand
    for pos in (0, 1, 7, 39):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(pe(5, 3), table[5:8])


def test_learned_positions_refuse_positions_past_their_table():
    model = Transformer(tiny_config("learned"))
    with pytest.raises(ContextTooLongError):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = Transformer(tiny_config(n_embd=64, n_head=4, n_layer=8, vocab_size=50))
    std = model.blocks[0].mlp.proj.weight.std().item()
    assert std == pytest.approx(0.02 / math.sqrt(16), rel=0.2)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.2)
    default = Transformer(tiny_config(n_embd=64, n_head=4, n_layer=8, vocab_size=50, init="pytorch"))
    assert default.blocks[0].mlp.fc.weight.std().item() > 0.05


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"n_embd": 10, "n_head": 4}, "divisible"),
        ({"n_embd": 6, "n_head": 2}, "even head size"),
        ({"n_layer": 0}, "n_layer"),
        ({"n_head": -1}, "n_head"),
        ({"seq_length": 0}, "seq_length"),
        ({"n_layer": True}, "n_layer=True must be a positive integer"),  # YAML's true is a bool, not 1 layer
        ({"init": "kaiming"}, "init"),
        ({"pos_encoding": {"name": "t6"}}, "pos_encoding"),
    ],
)
def test_bad_model_configs_are_rejected(kw, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(**kw)


@pytest.mark.parametrize("pe", ["sinusoidal", "rope"])
def test_position_tables_grown_during_generation_still_train(pe):
    model = Transformer(tiny_config(pe))
    with torch.inference_mode():
        model(torch.zeros(1, 40, dtype=torch.long))  # grows the cos/sin or sinusoidal table past 16
    model(torch.zeros(2, 40, dtype=torch.long)).sum().backward()  # would fail on inference tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_byte_dropout_drops_at_rate_p_and_keeps_the_expectation(dtype):
    from lm.kernels import byte_dropout

    torch.manual_seed(0)
    x = torch.ones(200_003, dtype=dtype, requires_grad=True)  # not a multiple of 8 random bytes
    y = byte_dropout(x, 0.2)
    assert y.dtype == dtype
    assert (y == 0).float().mean().item() == pytest.approx(51 / 256, abs=0.005)
    assert y.mean().item() == pytest.approx(1.0, abs=0.01)
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)  # gradients flow only through kept elements
    torch.manual_seed(1)
    a = byte_dropout(x, 0.2)
    torch.manual_seed(1)
    assert torch.equal(a, byte_dropout(x, 0.2))  # follows the global seed, so resumed runs repeat it


def test_alibi_slopes_follow_the_paper_for_any_head_count():
    assert alibi_slopes(8) == pytest.approx([2.0**-i for i in range(1, 9)])
    assert alibi_slopes(4) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    # not a power of two: the 4-head slopes, then every other slope of the 8-head set (1/2, 1/8)
    assert alibi_slopes(6) == pytest.approx([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3])
    assert alibi_slopes(12) == pytest.approx(
        [2.0 ** -(8 * i / 8) for i in range(1, 9)] + [2.0 ** -(8 * i / 16) for i in (1, 3, 5, 7)]
    )


def test_alibi_bias_is_minus_slope_times_distance_from_absolute_positions():
    alibi = ALiBi(n_head=2)  # slopes 1/16, 1/256
    queries, keys = torch.arange(5, 8), torch.arange(8)  # three queries continuing a cache of five positions
    bias = alibi.bias(queries, keys, torch.float32)
    assert bias.shape == (2, 3, 8)
    for h, slope in enumerate((2.0**-4, 2.0**-8)):
        for a, i in enumerate(range(5, 8)):
            for j in range(8):
                expected = -slope * (i - j) if j <= i else -math.inf
                assert bias[h, a, j].item() == pytest.approx(expected)


@pytest.mark.parametrize("pe", ["alibi", "none"])
def test_alibi_and_nope_embed_no_positions_and_read_past_the_training_length(pe):
    torch.manual_seed(0)
    model = Transformer(tiny_config(pe, n_head=4)).eval()
    assert model.position is None and model.rope is None
    assert (model.relative_bias is not None) == (pe == "alibi")
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for p in Transformer(tiny_config("rope", n_head=4)).parameters()
    )
    logits = model(torch.randint(0, 11, (2, 64)))  # 4x the training length
    assert torch.isfinite(logits).all()


def test_alibi_on_the_cpu_kernels_matches_sdpa_with_six_heads(monkeypatch):
    import lm.model

    torch.manual_seed(0)
    model = Transformer(tiny_config("alibi", n_head=6, n_embd=24)).double()
    idx = torch.randint(0, 11, (3, 16))
    fast = model(idx)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), model.blocks[0].attn.qkv.weight)
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", 0)
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 0)
    plain = model(idx)
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), model.blocks[0].attn.qkv.weight)
    assert torch.allclose(fast, plain, atol=1e-10) and torch.allclose(fast_grad, plain_grad, atol=1e-10)


@pytest.mark.parametrize("init", ["gpt2", "pytorch", "xavier"])
def test_each_init_gives_its_documented_weight_scale(init):
    torch.manual_seed(0)
    model = Transformer(tiny_config(init=init, n_embd=64, n_head=4, n_layer=4, vocab_size=50))
    fc = model.blocks[0].mlp.fc.weight  # (256, 64)
    expected_std = {
        "gpt2": 0.02,
        "pytorch": 1 / math.sqrt(64) / math.sqrt(3),  # U(+-1/sqrt(fan_in))
        "xavier": math.sqrt(6 / (64 + 256)) / math.sqrt(3),  # U(+-sqrt(6 / (fan_in + fan_out)))
    }[init]
    assert fc.std().item() == pytest.approx(expected_std, rel=0.05)
    assert all(
        torch.equal(b.weight, torch.ones_like(b.weight)) for b in model.modules() if isinstance(b, torch.nn.LayerNorm)
    )


def test_zero_proj_starts_every_block_as_the_identity_and_still_learns():
    torch.manual_seed(0)
    model = Transformer(tiny_config("rope", init="zero_proj"))
    projections = [m.proj.weight for block in model.blocks for m in (block.attn, block.mlp)]
    assert all(torch.count_nonzero(p) == 0 for p in projections)
    assert model.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.2)  # the rest as gpt2's
    idx = torch.randint(0, 11, (2, 8))
    with torch.no_grad():  # blocks add nothing: the logits are the head of the final norm of the embeddings
        expected = model.head(model.ln_f(model.token_embedding(idx)))
        assert torch.allclose(model(idx), expected, atol=1e-6)
    loss = F.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projections[-2:])


def test_cpu_kernels_take_contexts_past_256_while_the_scores_fit(monkeypatch):
    import lm.model

    calls = []
    original = lm.model.BlockCausalAttention.apply
    monkeypatch.setattr(lm.model.BlockCausalAttention, "apply", lambda *a: calls.append(a[0].shape) or original(*a))
    model = Transformer(tiny_config("alibi"))
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", 8)  # as 256 is to real contexts
    n_head = model.config.n_head
    idx = torch.randint(0, 11, (2, 16))
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 2 * n_head * 16 * 16)  # exactly fits: block kernel
    model(idx)
    assert len(calls) == model.config.n_layer
    monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", 2 * n_head * 16 * 16 - 1)  # one score over: PyTorch's
    model(idx)
    assert len(calls) == model.config.n_layer
