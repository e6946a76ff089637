"""Which `transformers` class computes the same function as a `TransformerConfig`, and the weight mapping each way.

A family is a native `transformers` architecture whose forward pass equals ours for the configs it `fits`:
GPT-2 (absolute positions, LayerNorm), GPT-NeoX (RoPE, LayerNorm), Llama (RMSNorm, SwiGLU), Qwen3 (the same with
QK-norm), Arcee (RMSNorm, a plain MLP) and Apertus (the same with QK-norm). Every family needs pre-LN blocks,
no logit soft-cap, full attention and RoPE without a context extension; anything else exports as custom code
(lm/hub/remote). The traps each mapping handles are in docs/export.md.

Only torch here: the `transformers` config is built from the returned keyword arguments by lm/hub/export.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lm.errors import CheckpointError
from lm.fused import RMS_EPS  # the blocks' RMSNorm and QK-norm alike
from lm.model import TransformerConfig
from lm.positional import sinusoidal_table

LAYERNORM_EPS = 1e-5  # nn.LayerNorm's default, which the model uses
PLAIN_MLPS = {"gelu": "gelu", "relu": "relu", "relu2": "relu2"}  # ours -> transformers' ACT2FN ("gelu" is exact erf)

State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Family:
    """A native `transformers` architecture: whether it fits a config, its config, and the weights each way."""

    model_type: str
    architecture: str
    fits: Callable[[TransformerConfig], bool]
    hf_config: Callable[[TransformerConfig], dict]
    to_hf: Callable[[TransformerConfig, State], State]
    from_hf: Callable[[TransformerConfig, State], State]


def plain_block(c: TransformerConfig) -> bool:
    """What every family needs: pre-LN, no soft-cap, no U-Net skips or value mixing, full attention, and RoPE (if
    any) as trained."""
    return (
        c.norm_position == "pre"
        and c.logit_softcap is None
        and not c.unet_skips
        and not c.value_embeddings
        and not c.value_residual
        and c.attention_window is None
        and (c.pos_encoding.name != "rope" or c.pos_encoding.scaling is None)
    )


def no_token_ids() -> dict:
    # a character vocabulary has no special tokens; the classes' defaults (GPT-2's 50256) would point past it
    return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def _bias(state: State, key: str, size: int) -> torch.Tensor:
    """Our bias, or zeros where the class requires one and the model has none (bias=false)."""
    return state[key] if key in state else torch.zeros(size)


def _put_norm(out: State, s: State, ours: str, hf: str, size: int) -> None:
    """A LayerNorm's gain and bias under the class's name, the bias zeros where the model has none."""
    out[f"{hf}.weight"] = s[f"{ours}.weight"]
    out[f"{hf}.bias"] = _bias(s, f"{ours}.bias", size)


def _take_bias(c: TransformerConfig, hf: State, key: str, ours: str, out: State) -> None:
    """The inverse of `_bias`: keeps the bias when the model has biases; otherwise it must still be zero."""
    if key not in hf:
        return
    if c.bias:
        out[ours] = hf[key]
    elif hf[key].abs().max() > 0:
        raise CheckpointError(
            f"{key} is not zero, but this model has no biases (model.bias=false): the exported weights were changed "
            "after export; load them with transformers instead."
        )


def _norm(c: TransformerConfig, hf: State, hf_prefix: str, ours: str, out: State) -> None:
    out[f"{ours}.weight"] = hf[f"{hf_prefix}.weight"]
    _take_bias(c, hf, f"{hf_prefix}.bias", f"{ours}.bias", out)


def _linear(c: TransformerConfig, hf: State, hf_prefix: str, ours: str, out: State, transpose: bool = False) -> None:
    weight = hf[f"{hf_prefix}.weight"]
    out[f"{ours}.weight"] = weight.t().contiguous() if transpose else weight
    _take_bias(c, hf, f"{hf_prefix}.bias", f"{ours}.bias", out)


def _head(c: TransformerConfig, hf: State, key: str, out: State) -> None:
    # a tied head is the token embedding itself; Transformer.state_dict lists it under both names
    out["head.weight"] = out["token_embedding.weight"] if c.tie_embeddings else hf[key]


# --------------------------------------------------------------------------------------------------------------
# GPT-2: learned, sinusoidal or no positions; LayerNorm; a GELU, ReLU or ReLU^2 MLP; multi-head attention


def gpt2_fits(c: TransformerConfig) -> bool:
    return (
        plain_block(c)
        and c.pos_encoding.name in ("learned", "sinusoidal", "none")
        and c.norm == "layernorm"
        and c.mlp in PLAIN_MLPS
        and not c.qk_norm
        and c.kv_heads == c.n_head
    )


def folds_embedding_scale(c: TransformerConfig) -> bool:
    """Sinusoidal positions scale the token embedding by sqrt(n_embd) first: GPT-2's wte holds it pre-scaled, so the
    head (which reads the unscaled embedding) can no longer share it."""
    return c.pos_encoding.name == "sinusoidal"


GPT2_POSITIONS = 1024  # GPT-2's own table length: fixed (sinusoidal) or empty (NoPE) positions reach that far


def gpt2_positions(c: TransformerConfig) -> int:
    """wpe's length: a learned table ends at the training context, as ours does; fixed and empty ones go on."""
    return c.seq_length if c.pos_encoding.name == "learned" else max(c.seq_length, GPT2_POSITIONS)


def gpt2_config(c: TransformerConfig) -> dict:
    return dict(
        vocab_size=c.vocab_size,
        n_positions=gpt2_positions(c),
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_inner=c.mlp_hidden,
        activation_function=PLAIN_MLPS[c.mlp],  # "gelu" is the exact erf form; GPT-2's own "gelu_new" is tanh's
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=LAYERNORM_EPS,
        scale_attn_weights=True,
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=c.tie_embeddings and not folds_embedding_scale(c),
        **no_token_ids(),
    )


def gpt2_to_hf(c: TransformerConfig, s: State) -> State:
    C = c.n_embd
    embedding = s["token_embedding.weight"]
    out = {"transformer.wte.weight": embedding * math.sqrt(C) if folds_embedding_scale(c) else embedding}
    if c.pos_encoding.name == "learned":
        out["transformer.wpe.weight"] = s["position.weight"]
    elif c.pos_encoding.name == "sinusoidal":
        out["transformer.wpe.weight"] = sinusoidal_table(gpt2_positions(c), C)
    else:  # NoPE: positions that add nothing
        out["transformer.wpe.weight"] = torch.zeros(gpt2_positions(c), C)
    # GPT-2's Conv1D stores (in, out): our nn.Linear weights transposed. Its biases are not optional.
    for i in range(c.n_layer):
        ours, hf = f"blocks.{i}.", f"transformer.h.{i}."
        for our_name, hf_name, width in (
            ("attn.qkv", "attn.c_attn", 3 * C),  # q, k, v stacked alike
            ("attn.proj", "attn.c_proj", C),
            ("mlp.fc", "mlp.c_fc", c.mlp_hidden),
            ("mlp.proj", "mlp.c_proj", C),
        ):
            out[f"{hf}{hf_name}.weight"] = s[f"{ours}{our_name}.weight"].t().contiguous()
            out[f"{hf}{hf_name}.bias"] = _bias(s, f"{ours}{our_name}.bias", width)
        for norm in ("ln_1", "ln_2"):
            _put_norm(out, s, ours + norm, hf + norm, C)
    _put_norm(out, s, "ln_f", "transformer.ln_f", C)
    out["lm_head.weight"] = s["head.weight"]
    return out


def gpt2_from_hf(c: TransformerConfig, hf: State) -> State:
    embedding = hf["transformer.wte.weight"]
    out = {"token_embedding.weight": embedding / math.sqrt(c.n_embd) if folds_embedding_scale(c) else embedding}
    if c.pos_encoding.name == "learned":
        out["position.weight"] = hf["transformer.wpe.weight"]
    for i in range(c.n_layer):
        ours, prefix = f"blocks.{i}.", f"transformer.h.{i}."
        for our_name, hf_name in (
            ("attn.qkv", "attn.c_attn"),
            ("attn.proj", "attn.c_proj"),
            ("mlp.fc", "mlp.c_fc"),
            ("mlp.proj", "mlp.c_proj"),
        ):
            _linear(c, hf, prefix + hf_name, ours + our_name, out, transpose=True)
        for norm in ("ln_1", "ln_2"):
            _norm(c, hf, prefix + norm, ours + norm, out)
    _norm(c, hf, "transformer.ln_f", "ln_f", out)
    if folds_embedding_scale(c) and c.tie_embeddings:
        out["head.weight"] = hf["lm_head.weight"]  # untied in the export, the same matrix
    else:
        _head(c, hf, "lm_head.weight", out)
    return out


# --------------------------------------------------------------------------------------------------------------
# GPT-NeoX: RoPE (partial too), LayerNorm, a GELU, ReLU or ReLU^2 MLP, sequential residuals


def neox_fits(c: TransformerConfig) -> bool:
    return (
        plain_block(c)
        and c.pos_encoding.name == "rope"
        and c.norm == "layernorm"
        and c.mlp in PLAIN_MLPS
        and not c.qk_norm
        and c.kv_heads == c.n_head
    )


def neox_config(c: TransformerConfig) -> dict:
    pe = c.pos_encoding
    return dict(
        vocab_size=c.vocab_size,
        hidden_size=c.n_embd,
        num_hidden_layers=c.n_layer,
        num_attention_heads=c.n_head,
        intermediate_size=c.mlp_hidden,
        hidden_act=PLAIN_MLPS[c.mlp],
        max_position_embeddings=c.seq_length,
        layer_norm_eps=LAYERNORM_EPS,
        # GPT-NeoX's defaults are not ours: a quarter of each head rotates, and attention and MLP run in parallel
        rope_parameters={"rope_type": "default", "rope_theta": pe.base, "partial_rotary_factor": pe.rotary_fraction},
        use_parallel_residual=False,
        attention_bias=c.bias,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        classifier_dropout=0.0,
        tie_word_embeddings=c.tie_embeddings,
        **no_token_ids(),
    )


def rotary_order(c: TransformerConfig) -> torch.Tensor:
    """Each head's channels in GPT-NeoX's partial-rotary order. Ours rotates pairs (i, i + D/2) for i < r/2 and leaves
    the other pairs still; GPT-NeoX rotates the first r channels as pairs (j, j + r/2). The identity when r = D."""
    D = c.head_dim
    half, r2 = D // 2, int(D * c.pos_encoding.rotary_fraction) // 2
    return torch.cat(
        [torch.arange(r2), torch.arange(half, half + r2), torch.arange(r2, half), torch.arange(half + r2, D)]
    )


def neox_qkv(c: TransformerConfig, tensor: torch.Tensor) -> torch.Tensor:
    """Our [all queries; all keys; all values] rows as GPT-NeoX's [q, k, v] per head, q and k in its rotary order."""
    H, D = c.n_head, c.head_dim
    rows = tensor.reshape(3, H, D, -1).clone()
    rows[:2] = rows[:2, :, rotary_order(c)]
    return rows.transpose(0, 1).reshape(tensor.shape)


def neox_qkv_back(c: TransformerConfig, tensor: torch.Tensor) -> torch.Tensor:
    H, D = c.n_head, c.head_dim
    rows = tensor.reshape(H, 3, D, -1).transpose(0, 1).clone()
    rows[:2, :, rotary_order(c)] = rows[:2].clone()
    return rows.reshape(tensor.shape)


def neox_to_hf(c: TransformerConfig, s: State) -> State:
    C = c.n_embd
    out = {"gpt_neox.embed_in.weight": s["token_embedding.weight"]}
    for i in range(c.n_layer):
        ours, hf = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        out[f"{hf}attention.query_key_value.weight"] = neox_qkv(c, s[f"{ours}attn.qkv.weight"])
        out[f"{hf}attention.dense.weight"] = s[f"{ours}attn.proj.weight"]
        if c.bias:  # attention biases follow attention_bias; the MLP's and the norms' are always there
            out[f"{hf}attention.query_key_value.bias"] = neox_qkv(c, s[f"{ours}attn.qkv.bias"])
            out[f"{hf}attention.dense.bias"] = s[f"{ours}attn.proj.bias"]
        out[f"{hf}mlp.dense_h_to_4h.weight"] = s[f"{ours}mlp.fc.weight"]
        out[f"{hf}mlp.dense_h_to_4h.bias"] = _bias(s, f"{ours}mlp.fc.bias", c.mlp_hidden)
        out[f"{hf}mlp.dense_4h_to_h.weight"] = s[f"{ours}mlp.proj.weight"]
        out[f"{hf}mlp.dense_4h_to_h.bias"] = _bias(s, f"{ours}mlp.proj.bias", C)
        for our_norm, hf_norm in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            _put_norm(out, s, ours + our_norm, hf + hf_norm, C)
    _put_norm(out, s, "ln_f", "gpt_neox.final_layer_norm", C)
    out["lm_head.weight"] = s["head.weight"]
    return out


def neox_from_hf(c: TransformerConfig, hf: State) -> State:
    out = {"token_embedding.weight": hf["gpt_neox.embed_in.weight"]}
    for i in range(c.n_layer):
        ours, prefix = f"blocks.{i}.", f"gpt_neox.layers.{i}."
        out[f"{ours}attn.qkv.weight"] = neox_qkv_back(c, hf[f"{prefix}attention.query_key_value.weight"])
        out[f"{ours}attn.proj.weight"] = hf[f"{prefix}attention.dense.weight"]
        if c.bias:
            out[f"{ours}attn.qkv.bias"] = neox_qkv_back(c, hf[f"{prefix}attention.query_key_value.bias"])
            out[f"{ours}attn.proj.bias"] = hf[f"{prefix}attention.dense.bias"]
        _linear(c, hf, f"{prefix}mlp.dense_h_to_4h", f"{ours}mlp.fc", out)
        _linear(c, hf, f"{prefix}mlp.dense_4h_to_h", f"{ours}mlp.proj", out)
        _norm(c, hf, f"{prefix}input_layernorm", f"{ours}ln_1", out)
        _norm(c, hf, f"{prefix}post_attention_layernorm", f"{ours}ln_2", out)
    _norm(c, hf, "gpt_neox.final_layer_norm", "ln_f", out)
    # the class's head is lm_head; save_pretrained writes it under GPT-NeoX's original name, embed_out
    _head(c, hf, "embed_out.weight" if "embed_out.weight" in hf else "lm_head.weight", out)
    return out


# --------------------------------------------------------------------------------------------------------------
# The Llama layout (Llama, Qwen3, Arcee, Apertus): RoPE over whole heads, RMSNorm, separate q, k, v, GQA


@dataclass(frozen=True)
class LlamaLayout:
    """How one Llama-like class names its norms and shapes its MLP."""

    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    gated: bool = True  # SwiGLU: gate_proj and up_proj; else up_proj -> activation -> down_proj
    qk_norm: bool = False
    biases: bool = True  # attention_bias and mlp_bias exist


LLAMA = LlamaLayout()
QWEN3 = LlamaLayout(qk_norm=True, biases=False)
ARCEE = LlamaLayout(gated=False)
APERTUS = LlamaLayout(norms=("attention_layernorm", "feedforward_layernorm"), gated=False, qk_norm=True, biases=False)


def llama_fits(layout: LlamaLayout) -> Callable[[TransformerConfig], bool]:
    def fits(c: TransformerConfig) -> bool:
        return (
            plain_block(c)
            and c.pos_encoding.name == "rope"
            and c.pos_encoding.rotary_fraction == 1
            and c.norm == "rmsnorm"
            and (c.mlp == "swiglu" if layout.gated else c.mlp in PLAIN_MLPS)
            and c.qk_norm == layout.qk_norm
            and (layout.biases or not c.bias)
        )

    return fits


def llama_config(layout: LlamaLayout, has_head_dim: bool = True) -> Callable[[TransformerConfig], dict]:
    def config(c: TransformerConfig) -> dict:
        settings = dict(
            vocab_size=c.vocab_size,
            hidden_size=c.n_embd,
            intermediate_size=c.mlp_hidden,
            num_hidden_layers=c.n_layer,
            num_attention_heads=c.n_head,
            num_key_value_heads=c.kv_heads,
            hidden_act="silu" if layout.gated else PLAIN_MLPS[c.mlp],
            max_position_embeddings=c.seq_length,
            rms_norm_eps=RMS_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": c.pos_encoding.base},
            attention_bias=c.bias,
            attention_dropout=0.0,
            tie_word_embeddings=c.tie_embeddings,
            **no_token_ids(),
        )
        if has_head_dim:  # Qwen3's default is 128, not hidden_size / heads
            settings["head_dim"] = c.head_dim
        if layout.biases:
            settings["mlp_bias"] = c.bias
        return settings

    return config


def llama_renames(c: TransformerConfig, layout: LlamaLayout) -> dict[str, str]:
    """Our name -> the class's for every tensor that maps one to one (the fused qkv and MLP input are split apart)."""
    names = {"token_embedding.weight": "model.embed_tokens.weight", "ln_f.weight": "model.norm.weight"}
    for i in range(c.n_layer):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        names[f"{ours}ln_1.weight"] = f"{hf}{layout.norms[0]}.weight"
        names[f"{ours}ln_2.weight"] = f"{hf}{layout.norms[1]}.weight"
        if layout.qk_norm:
            names[f"{ours}attn.q_norm.weight"] = f"{hf}self_attn.q_norm.weight"
            names[f"{ours}attn.k_norm.weight"] = f"{hf}self_attn.k_norm.weight"
        for kind in ("weight", "bias") if c.bias else ("weight",):
            names[f"{ours}attn.proj.{kind}"] = f"{hf}self_attn.o_proj.{kind}"
            names[f"{ours}mlp.proj.{kind}"] = f"{hf}mlp.down_proj.{kind}"
    return names


def llama_to_hf(layout: LlamaLayout) -> Callable[[TransformerConfig, State], State]:
    def to_hf(c: TransformerConfig, s: State) -> State:
        out = {hf: s[ours] for ours, hf in llama_renames(c, layout).items()}
        sizes = [c.n_head * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        for i in range(c.n_layer):
            ours, hf = f"blocks.{i}.", f"model.layers.{i}."
            for kind in ("weight", "bias") if c.bias else ("weight",):
                q, k, v = s[f"{ours}attn.qkv.{kind}"].split(sizes)
                out |= {f"{hf}self_attn.{name}_proj.{kind}": t for name, t in zip("qkv", (q, k, v), strict=True)}
                if layout.gated:  # our fc computes [gate; up] in one matrix: silu(gate) * up
                    gate, up = s[f"{ours}mlp.fc.{kind}"].chunk(2)
                    out[f"{hf}mlp.gate_proj.{kind}"], out[f"{hf}mlp.up_proj.{kind}"] = gate, up
                else:
                    out[f"{hf}mlp.up_proj.{kind}"] = s[f"{ours}mlp.fc.{kind}"]
        out["lm_head.weight"] = s["head.weight"]
        return out

    return to_hf


def llama_from_hf(layout: LlamaLayout) -> Callable[[TransformerConfig, State], State]:
    def from_hf(c: TransformerConfig, hf: State) -> State:
        out = {ours: hf[name] for ours, name in llama_renames(c, layout).items()}
        for i in range(c.n_layer):
            ours, prefix = f"blocks.{i}.", f"model.layers.{i}."
            for kind in ("weight", "bias") if c.bias else ("weight",):
                out[f"{ours}attn.qkv.{kind}"] = torch.cat([hf[f"{prefix}self_attn.{n}_proj.{kind}"] for n in "qkv"])
                up = hf[f"{prefix}mlp.up_proj.{kind}"]
                gated = [hf[f"{prefix}mlp.gate_proj.{kind}"], up] if layout.gated else [up]
                out[f"{ours}mlp.fc.{kind}"] = torch.cat(gated)
        _head(c, hf, "lm_head.weight", out)
        return out

    return from_hf


def llama_family(model_type: str, architecture: str, layout: LlamaLayout, has_head_dim: bool = True) -> Family:
    return Family(
        model_type,
        architecture,
        llama_fits(layout),
        llama_config(layout, has_head_dim),
        llama_to_hf(layout),
        llama_from_hf(layout),
    )


# the first that fits is taken
FAMILIES = (
    Family("gpt2", "GPT2LMHeadModel", gpt2_fits, gpt2_config, gpt2_to_hf, gpt2_from_hf),
    Family("gpt_neox", "GPTNeoXForCausalLM", neox_fits, neox_config, neox_to_hf, neox_from_hf),
    llama_family("llama", "LlamaForCausalLM", LLAMA),
    llama_family("qwen3", "Qwen3ForCausalLM", QWEN3),
    llama_family("arcee", "ArceeForCausalLM", ARCEE),
    llama_family("apertus", "ApertusForCausalLM", APERTUS, has_head_dim=False),
)


def native_family(config: TransformerConfig) -> Family | None:
    """The native `transformers` family that computes the same function as `config`, or None (custom code)."""
    return next((family for family in FAMILIES if family.fits(config)), None)


def family_named(model_type: str) -> Family:
    return next(family for family in FAMILIES if family.model_type == model_type)
