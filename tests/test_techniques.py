"""The block's techniques (model.norm, norm_position, mlp, qk_norm, tie_embeddings, logit_softcap): each against a
plain PyTorch reference of the same computation, on both CPU attention paths and every positional encoding, in
generation with the KV cache, and through training, resume, evaluation past the context and DDP."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import ROOT, VOCAB, only_run, run_train
from omegaconf import OmegaConf

from lm import generate
from lm.config import compose_config
from lm.decoding import decode_step
from lm.errors import ConfigError
from lm.fused import (
    ReLU2Function,
    RMSNormFunction,
    SwiGLUFunction,
    relu2,
    relu2_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
    swiglu_reference,
)
from lm.model import POSITIONAL_ENCODINGS, KVCache, RMSNorm, Transformer, TransformerConfig
from lm.optim import parameter_groups
from lm.tokenizer import CharTokenizer

# each option alone, the modern recipe, and a mix with post-LN and SwiGLU
OPTIONS = {
    "rmsnorm": dict(norm="rmsnorm"),
    "post": dict(norm_position="post"),
    "relu": dict(mlp="relu"),
    "relu2": dict(mlp="relu2"),
    "swiglu": dict(mlp="swiglu"),
    "qk_norm": dict(qk_norm=True),
    "untied": dict(tie_embeddings=False),
    "softcap": dict(logit_softcap=2.0),  # small, so that the cap bends these random logits
    "modern": dict(norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=2.0),
    "post_swiglu_rms": dict(norm="rmsnorm", norm_position="post", mlp="swiglu", qk_norm=True),
    "unet": dict(unet_skips=True, n_layer=5),  # two pairs and a middle block
    "unet_modern_post": dict(unet_skips=True, n_layer=4, norm="rmsnorm", norm_position="post", qk_norm=True),
    "value_embeddings": dict(value_embeddings=1, n_layer=3),  # layers 0 and 2 share the table, layer 1 has none
    "value_residual": dict(value_residual=True, n_layer=3),
    # both, with two tables over four layers, post-LN, QK-norm, grouped-query attention and U-Net skips
    "value_mix_gqa_post": dict(
        value_embeddings=2,
        value_residual=True,
        n_layer=4,
        n_head=4,
        n_kv_head=2,
        norm_position="post",
        qk_norm=True,
        unet_skips=True,
    ),
}
MODERN_OVERRIDES = [
    "model.norm=rmsnorm",
    "model.mlp=relu2",
    "model.qk_norm=true",
    "model.tie_embeddings=false",
    "model.logit_softcap=30",
]


def model_with(options: dict, pe: str, seq_length: int = 24, dtype=torch.float64) -> Transformer:
    """Two layers, random weights larger than at initialisation (varied logits), norm gains away from 1."""
    torch.manual_seed(0)
    settings = dict(vocab_size=len(VOCAB), seq_length=seq_length, n_layer=2, n_head=2, n_embd=16)
    config = TransformerConfig(**{**settings, **options}, pos_encoding={"name": pe})
    model = Transformer(config).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.4) if param.dim() >= 2 else param.uniform_(0.5, 1.5)
    return model


def reference_logits(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The model's computation written out in plain PyTorch from its weights and config: composite norms and
    activations, attention as softmax(q k^T / sqrt(D) + mask) v."""
    config = model.config
    B, T = idx.shape
    H, H_kv, D, L, K = config.n_head, config.kv_heads, config.head_dim, config.n_layer, config.value_embeddings
    first_values = []  # the first layer's values, for a value residual

    def norm(module, x):
        if isinstance(module, RMSNorm):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.eps) * module.weight
        return F.layer_norm(x, (x.shape[-1],), module.weight, module.bias, module.eps)

    def attention(attn, x):
        q, k, v = attn.qkv(x).split([H * D, H_kv * D, H_kv * D], -1)
        i = attn.layer  # value embeddings: table i for layer i < K and for layer L - K + i; the value residual
        table = i if i < K else i - (L - K) if i >= L - K else None
        sources = [model.value_embeddings[table](idx)] if table is not None else []
        sources += first_values if config.value_residual and i > 0 else []
        if sources:
            v = attn.value_lambdas[0] * v + sum(
                weight * e for weight, e in zip(attn.value_lambdas[1:], sources, strict=True)
            )
        if config.value_residual and i == 0:
            first_values.append(v)
        q = q.view(B, T, H, D)
        k, v = (t.view(B, T, H_kv, D).repeat_interleave(H // H_kv, dim=2) for t in (k, v))
        if attn.q_norm is not None:
            q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
        if model.rope is not None:  # x cos + rotate_half(x) sin, from the fp32 tables; xPos also scales q by
            # zeta^(n / 512) and k by zeta^(-m / 512), folded into its fp32 tables
            cos, sin = model.rope.tables(0, T)
            cos_q = sin_q = None
            if config.pos_encoding.name == "xpos":
                zeta = (torch.arange(0, D, 2, dtype=torch.float64) + 0.4 * D) / (1.4 * D)
                scale = zeta ** (torch.arange(T, dtype=torch.float64)[:, None] / 512)
                scale = torch.cat([scale, scale], -1)
                cos, sin = cos.double(), sin.double()
                cos_q, sin_q = (cos * scale).float(), (sin * scale).float()
                cos, sin = (cos / scale).float(), (sin / scale).float()

            def rotate(x, cos, sin):
                x1, x2 = x.chunk(2, -1)
                return x * cos[None, :, None].to(x.dtype) + torch.cat([-x2, x1], -1) * sin[None, :, None].to(x.dtype)

            q, k = rotate(q, cos if cos_q is None else cos_q, sin if sin_q is None else sin_q), rotate(k, cos, sin)
        scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        mask = torch.ones(T, T, dtype=torch.bool).tril()
        if model.relative_bias is not None:
            positions = torch.arange(T)
            scores = scores + model.relative_bias.bias(positions, positions, scores.dtype)
        scores = scores.masked_fill(~mask, -math.inf)
        y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, -1)
        return attn.proj(y)

    def mlp(block, x):
        h = block.mlp.fc(x)
        h = {
            "gelu": F.gelu,
            "relu": F.relu,
            "relu2": lambda h: F.relu(h) ** 2,
            "swiglu": lambda h: F.silu(h.chunk(2, -1)[0]) * h.chunk(2, -1)[1],
        }[config.mlp](h)
        return block.mlp.proj(h)

    x = model.token_embedding(idx)
    if config.pos_encoding.name == "sinusoidal":
        x = x * math.sqrt(config.n_embd) + model.position(0, T)
    elif config.pos_encoding.name == "learned":
        x = x + model.position(0, T)
    outputs = []  # each block's output
    for i, block in enumerate(model.blocks):
        partner = config.n_layer - 1 - i  # U-Net: the first half's outputs, mirrored, join the second half's inputs
        if config.unet_skips and partner < i:
            x = x + model.skip_weights[partner] * outputs[partner]
        if config.norm_position == "post":
            x = norm(block.ln_1, x + attention(block.attn, x))
            x = norm(block.ln_2, x + mlp(block, x))
        else:
            x = x + attention(block.attn, norm(block.ln_1, x))
            x = x + mlp(block, norm(block.ln_2, x))
        outputs.append(x)
    if config.norm_position == "pre":
        x = norm(model.ln_f, x)
    weight = model.token_embedding.weight if config.tie_embeddings else model.head.weight
    logits = x @ weight.T
    if config.logit_softcap is not None:
        logits = config.logit_softcap * torch.tanh(logits / config.logit_softcap)
    return logits


def logits_and_grads(model, forward, idx):
    model.zero_grad()
    logits = forward(idx)
    (logits.float() * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits, {name: p.grad.clone() for name, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------------------------
# The hand-written passes


def test_fused_functions_have_exact_gradients_and_match_their_references():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNormFunction.apply(a, w, 1e-6), (x, weight))
    assert torch.autograd.gradcheck(lambda a: RMSNormFunction.apply(a, None, 1e-6), (x,))
    assert torch.autograd.gradcheck(ReLU2Function.apply, (x,))
    assert torch.autograd.gradcheck(SwiGLUFunction.apply, (x,))
    for fast, reference, args in (
        (rms_norm, rms_norm_reference, (x, weight)),
        (relu2, relu2_reference, (x,)),
        (swiglu, swiglu_reference, (x,)),
    ):
        assert torch.allclose(fast(*args), reference(*args), atol=1e-12)


@pytest.mark.parametrize("fast,reference", [(relu2, relu2_reference), (swiglu, swiglu_reference)])
def test_fused_activations_in_bf16_stay_within_bf16_rounding(fast, reference):
    torch.manual_seed(0)
    x = torch.randn(64, 96).bfloat16().requires_grad_()
    grad = torch.randn_like(reference(x))
    (fast_grad,) = torch.autograd.grad(fast(x), x, grad)
    (exact_grad,) = torch.autograd.grad(reference(x.double()), x, grad.double())
    assert torch.allclose(fast(x).double(), reference(x.double()), rtol=2e-2, atol=2e-2)
    assert torch.allclose(fast_grad.double(), exact_grad.double(), rtol=2e-2, atol=5e-2)


def test_rms_norm_of_bf16_inputs_sums_in_fp32():
    torch.manual_seed(0)
    x = (torch.randn(32, 256) * 50).bfloat16()
    exact = rms_norm_reference(x.double(), None)
    assert (rms_norm(x, None).double() - exact).abs().max() < 2e-2


# --------------------------------------------------------------------------------------------------------------
# The model against the reference


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize("option", OPTIONS)
def test_each_option_matches_the_plain_pytorch_reference_in_values_and_gradients(option, pe):
    """float64 takes the block kernel (the CPU path for bf16 and for dropout), with QK-norm inside RotaryHeads."""
    model = model_with(OPTIONS[option], pe)
    idx = torch.randint(0, len(VOCAB), (3, 20))
    fast, fast_grads = logits_and_grads(model, model, idx)
    plain, plain_grads = logits_and_grads(model, lambda i: reference_logits(model, i), idx)
    assert torch.allclose(fast, plain, atol=1e-10)
    assert fast_grads.keys() == plain_grads.keys()
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, plain_grads[name], atol=1e-9), name


@pytest.mark.parametrize("pe", ["rope", "learned", "alibi"])
@pytest.mark.parametrize("option", ["qk_norm", "modern", "post_swiglu_rms", "value_mix_gqa_post"])
def test_fp32_flash_path_and_generic_path_agree_with_the_reference(option, pe, monkeypatch):
    """fp32 without dropout takes PyTorch's flash kernel after RotaryHeads; past the CPU kernels' limits (here forced
    for every length) the generic path, as on CUDA."""
    import lm.model

    model = model_with(OPTIONS[option], pe, dtype=torch.float32)
    idx = torch.randint(0, len(VOCAB), (3, 20))
    expected, expected_grads = logits_and_grads(model, lambda i: reference_logits(model, i), idx)
    for limit in (lm.model.CPU_KERNELS_MAX_LENGTH, 0):
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_LENGTH", limit)
        monkeypatch.setattr(lm.model, "CPU_KERNELS_MAX_SCORES", limit)
        got, grads = logits_and_grads(model, model, idx)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
        for name, grad in grads.items():
            assert torch.allclose(grad, expected_grads[name], rtol=1e-3, atol=1e-3), (limit, name)


@pytest.mark.parametrize("option", ["modern", "post_swiglu_rms"])
def test_bf16_autocast_stays_close_to_fp32(option):
    model = model_with(OPTIONS[option], "rope", dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():  # initialisation's scale: bf16's relative error stays bf16's
            if param.dim() >= 2:
                param.mul_(0.1)
    idx = torch.randint(0, len(VOCAB), (4, 24))
    exact = model(idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rounded = model(idx)
    assert (rounded.float() - exact).abs().max() < 0.05 * exact.abs().max()


@pytest.mark.parametrize("option", OPTIONS)
def test_options_keep_the_model_causal(option):
    model = model_with(OPTIONS[option], "rope")
    idx = torch.randint(0, len(VOCAB), (2, 20))
    changed = idx.clone()
    changed[:, 12:] = (changed[:, 12:] + 1) % len(VOCAB)
    assert torch.allclose(model(idx)[:, :12], model(changed)[:, :12], atol=1e-12)


def test_the_defaults_are_gpt2s_block_and_old_configs_read_them():
    config = TransformerConfig(vocab_size=11)  # what a checkpoint written before these options holds
    assert (config.norm, config.norm_position, config.mlp) == ("layernorm", "pre", "gelu")
    assert (config.qk_norm, config.tie_embeddings, config.logit_softcap) == (False, True, None)
    model = Transformer(TransformerConfig(vocab_size=11, n_layer=1, n_head=2, n_embd=8))
    assert model.head.weight is model.token_embedding.weight
    names = {name for name, _ in model.named_parameters()}
    assert names == {
        "token_embedding.weight",
        "blocks.0.ln_1.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.0.attn.proj.weight",
        "blocks.0.ln_2.weight",
        "blocks.0.mlp.fc.weight",
        "blocks.0.mlp.proj.weight",
        "ln_f.weight",
    }


def test_options_change_the_parameters_as_documented():
    sizes = dict(vocab_size=65, n_layer=2, n_head=4, n_embd=128)
    default = Transformer(TransformerConfig(**sizes))
    swiglu_model = Transformer(TransformerConfig(**sizes, mlp="swiglu"))
    assert swiglu_model.blocks[0].mlp.fc.weight.shape == (2 * 344, 128)  # 8/3 x 128 = 341.3, to a multiple of 8
    assert abs(swiglu_model.num_parameters() / default.num_parameters() - 1) < 0.01
    untied = Transformer(TransformerConfig(**sizes, tie_embeddings=False))
    assert untied.num_parameters() == default.num_parameters() + 65 * 128
    qk = Transformer(TransformerConfig(**sizes, qk_norm=True))
    assert qk.num_parameters() == default.num_parameters() + 2 * 2 * 32  # a gain per head channel, q and k, per layer
    assert torch.equal(qk.blocks[0].attn.q_norm.weight, torch.ones(32))  # gains start at 1 under every init
    post = Transformer(TransformerConfig(**sizes, norm_position="post"))
    assert isinstance(post.ln_f, torch.nn.Identity)  # the last block's norm is the final one
    assert TransformerConfig(vocab_size=65, n_embd=384, n_head=6, mlp="swiglu").mlp_hidden == 1024
    for init in ("gpt2", "pytorch", "xavier", "zero_proj"):  # a weight per pair, starting at 1 under every init
        unet = Transformer(TransformerConfig(**{**sizes, "n_layer": 5}, unet_skips=True, init=init))
        assert torch.equal(unet.skip_weights, torch.ones(2)), init  # the middle block of five has no pair
    assert unet.num_parameters() == Transformer(TransformerConfig(**{**sizes, "n_layer": 5})).num_parameters() + 2
    # value embeddings: a vocabulary x (key/value width) table each; a mixing weight per source and layer, plus the
    # layer's own values' weight, starting at an even mean under every init
    four = {**sizes, "n_layer": 4, "n_kv_head": 2}
    plain = Transformer(TransformerConfig(**four)).num_parameters()
    for init in ("gpt2", "pytorch", "xavier", "zero_proj"):
        mixed = Transformer(TransformerConfig(**four, value_embeddings=1, value_residual=True, init=init))
        lambdas = [b.attn.value_lambdas for b in mixed.blocks]
        # layer 0: the table; 1 and 2: the first layer's values; 3: the table and the first layer's values
        assert [len(lam) for lam in lambdas] == [2, 2, 2, 3], init
        assert all(torch.allclose(lam, torch.full_like(lam, 1 / len(lam))) for lam in lambdas), init
    assert mixed.value_embeddings[0].weight.shape == (65, 2 * 32)
    assert mixed.num_parameters() == plain + 65 * 64 + 2 + 2 + 2 + 3
    groups = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(mixed)}
    assert id(mixed.value_embeddings[0].weight) in groups["embeddings"]  # AdamW's, with the embedding's lr
    assert all(id(lam) in groups["vectors"] for lam in lambdas)


def test_unet_skips_feed_each_first_half_output_to_its_mirrored_block():
    """With every block's MLP and attention silenced, block i's output is its input: the stream then shows which
    outputs the skips added, and with what weight."""
    model = Transformer(TransformerConfig(vocab_size=11, n_layer=4, n_head=2, n_embd=8, unet_skips=True))
    seen = []
    with torch.no_grad():
        model.skip_weights.copy_(torch.tensor([10.0, 100.0]))
        out = model.through_blocks(torch.ones(1), lambda block, h: seen.append(h.item()) or h + 1)
    # blocks 0 and 1 give 2 and 3; block 2 gets 3 + 100 * 3 (block 1's output), block 3 gets 304 + 10 * 2
    assert seen == [1, 2, 303, 324] and out.item() == 325


def test_soft_capped_logits_stay_below_the_cap():
    model = model_with(dict(logit_softcap=0.5), "rope")
    logits = model(torch.randint(0, len(VOCAB), (2, 20)))
    assert logits.abs().max() <= 0.5 and logits.abs().max() > 0.4
    assert logits.dtype == torch.float64  # the cap keeps the model's dtype (widens bf16 only)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(norm="batchnorm"), "model.norm='batchnorm' is not one of layernorm, rmsnorm"),
        (dict(norm_position="middle"), "model.norm_position='middle' is not one of pre, post"),
        (dict(mlp="tanh"), "model.mlp='tanh' is not one of gelu, relu, relu2, swiglu"),
        (dict(qk_norm="yes"), "model.qk_norm='yes' must be true or false"),
        (dict(tie_embeddings=1), "model.tie_embeddings=1 must be true or false"),
        (dict(logit_softcap=0), "model.logit_softcap=0 must be a positive number, or null"),
        (dict(logit_softcap=-3.0), "model.logit_softcap=-3.0 must be a positive number"),
        (dict(unet_skips="on"), "model.unet_skips='on' must be true or false"),
        (dict(value_residual=1), "model.value_residual=1 must be true or false"),
        (
            dict(value_embeddings=2, n_layer=3),
            "model.value_embeddings=2 must be a whole number from 0 to n_layer // 2 = 1",
        ),
        (dict(value_embeddings=-1), "model.value_embeddings=-1 must be a whole number"),
    ],
)
def test_bad_option_values_are_refused_with_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        TransformerConfig(vocab_size=11, **kw)


# --------------------------------------------------------------------------------------------------------------
# Generation, training, resume, evaluation past the context, DDP


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
@pytest.mark.parametrize(
    "option", ["post", "swiglu", "relu2", "modern", "post_swiglu_rms", "unet", "value_embeddings", "value_mix_gqa_post"]
)
def test_decoding_with_the_cache_matches_the_full_forward(option, pe):
    model = model_with(OPTIONS[option], pe, dtype=torch.float32).eval()
    idx = torch.randint(0, len(VOCAB), (3, 24))
    with torch.inference_mode():
        full = model(idx)
        cache = KVCache(model.config, 3, 24, "cpu", torch.float32)
        assert torch.allclose(model(idx[:, :5], cache), full[:, :5], atol=1e-4)
        for t in range(5, 24):
            logits = decode_step(model, idx[:, t], cache.positions[t], cache)
            cache.length += 1
            assert torch.allclose(logits, full[:, t], atol=1e-4), f"position {t}"


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_greedy_text_with_the_cache_equals_without_and_goes_past_the_context(pe):
    model, tok = model_with(OPTIONS["modern"], pe, dtype=torch.float32).eval(), CharTokenizer(VOCAB)
    kwargs = dict(prompt="To be", max_new_tokens=19, temperature=0)
    assert generate(model, tok, exact=True, **kwargs) == generate(model, tok, kv_cache=False, **kwargs)
    for kv_cache in (True, False):  # past the context of 24: a sliding or a rebuilt cache, or the window
        text = generate(model, tok, "To be", max_new_tokens=40, temperature=1.0, seed=0, kv_cache=kv_cache)[0]
        assert len(text) == len("To be") + 40 and text.startswith("To be")


def test_a_modern_run_trains_resumes_evaluates_past_its_context_and_generates(tmp_path, corpus, cli):
    common = [f"data.path={corpus}", "model=tiny", "data.seq_length=32", "data.batch_size=8", "logger=csv"]
    common += ["trainer.val_check_interval=10", "callbacks.text_sample.max_new_tokens=0", *MODERN_OVERRIDES]
    cli.train([*common, "trainer.max_steps=30", "optimizer=muon", "optimizer.lr=1e-2"], tmp_path)
    run = only_run(tmp_path / "outputs")
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    saved = checkpoint["transformer_lm"]["model_config"]
    assert (saved["norm"], saved["mlp"], saved["qk_norm"], saved["tie_embeddings"]) == ("rmsnorm", "relu2", True, False)
    assert (
        "model.head.weight" in checkpoint["state_dict"]
        and "model.blocks.0.attn.q_norm.weight" in checkpoint["state_dict"]
    )
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 30 and summary["metrics"]["val/loss"] < math.log(len(VOCAB))
    cli.train([*common, "trainer.max_steps=40", "optimizer=muon", "optimizer.lr=1e-2", f"resume={run}"], tmp_path)
    resumed = json.loads((run / "summary.json").read_text())
    assert resumed["global_step"] == 40
    result = cli.script(
        "evaluate.py",
        f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
        "precision=32",
        "context_lengths=[32,64]",
        "past_context=40",
    )
    report = json.loads((run / "checkpoints" / "last.ctx32-64.past40.eval.json").read_text())
    rows = {r["context_length"]: r for r in report["results"]}
    assert rows[32]["loss"] == pytest.approx(resumed["metrics"]["val/loss"], abs=1e-3)  # what training logged
    assert 0 < rows[64]["loss"] < 10  # RoPE reads past its training context
    assert "sliding cache" in report["past_context"]["losses"] and result.returncode == 0
    text = cli.script("generate.py", f"ckpt={run}", "prompt=ab", "max_new_tokens=80", "seed=0").stdout
    assert len(text.rstrip("\n")) >= 80


def test_ddp_trains_the_modern_block_with_gqa_and_a_window_on_two_processes(tmp_path, corpus):
    run_train(
        [
            f"data.path={corpus}",
            "model=tiny",
            "data.seq_length=32",
            "data.batch_size=8",
            "trainer=ddp",
            "trainer.max_steps=12",
            "trainer.val_check_interval=6",
            "logger=csv",
            "callbacks.text_sample.max_new_tokens=0",
            *MODERN_OVERRIDES,
            "model.n_kv_head=1",
            "model.attention_window=16",
            "model.attention_sinks=2",
        ],
        tmp_path,
        python_warnings=None,
    )
    run = only_run(tmp_path / "outputs")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["global_step"] == 12 and math.isfinite(summary["metrics"]["val/loss"])


# --------------------------------------------------------------------------------------------------------------
# The study's variants


def variant_model(name: str) -> dict:
    cfg = compose_config([f"variant={name}"])
    settings = {k: cfg.model[k] for k in ("norm", "norm_position", "mlp", "qk_norm", "tie_embeddings", "logit_softcap")}
    return {**settings, "pos_encoding": cfg.model.pos_encoding.name, "optimizer": cfg.optimizer._target_}


LADDER = ["t2017", "pre_ln", "gelu", "gpt2", "rmsnorm", "rope", "relu2", "qk_norm", "untied", "softcap", "modern"]


def test_the_ladder_changes_one_thing_a_rung_and_leave_one_out_removes_one_each():
    study = OmegaConf.load(ROOT / "conf" / "experiment" / "technique_study.yaml")
    swept = study.hydra.sweeper.params.variant.split(",")
    assert set(LADDER) <= set(swept) and len(swept) == len(set(swept))
    rungs = [variant_model(name) for name in LADDER]
    assert rungs[0] == {
        "norm": "layernorm",
        "norm_position": "post",
        "mlp": "relu",
        "qk_norm": False,
        "tie_embeddings": True,
        "logit_softcap": None,
        "pos_encoding": "sinusoidal",
        "optimizer": "torch.optim.AdamW",
    }
    for lower, upper in zip(rungs, rungs[1:], strict=False):
        assert sum(lower[k] != upper[k] for k in lower) == 1, (lower, upper)
    gpt2 = variant_model("gpt2")
    assert (gpt2["norm_position"], gpt2["mlp"], gpt2["pos_encoding"]) == ("pre", "gelu", "learned")
    modern = rungs[-1]
    for name in swept:
        if name.startswith("no_") or name == "modern_swiglu":
            assert sum(modern[k] != v for k, v in variant_model(name).items()) == 1, name
    for name in swept:  # each variant carries its own lr, from the scan
        assert compose_config([f"variant={name}"]).optimizer.lr > 0
