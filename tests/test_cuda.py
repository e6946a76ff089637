"""GPU tests (`python -m pytest -m cuda`): skipped where PyTorch sees no CUDA device, as in CI."""

import pytest
import torch
from helpers import FAST, VOCAB, csv_column, last_checkpoint, loss_of, only_run, random_model, run_train, tiny_model

from lm import generate
from lm.model import POSITIONAL_ENCODINGS, Transformer, TransformerConfig
from lm.optim import MuonWithAdamW, parameter_groups
from lm.tokenizer import CharTokenizer

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_the_model_on_cuda_gives_the_cpus_logits(pe):
    # on CUDA attention is PyTorch's fused kernel; on a CPU, for these lengths, the project's own kernels
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=40, seq_length=64, n_layer=2, n_head=4, n_embd=64, pos_encoding={"name": pe})
    model = Transformer(config).eval()
    idx = torch.randint(0, 40, (3, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on_cpu = model(idx)
        on_gpu = model.cuda()(idx.cuda()).cpu()
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3), (on_gpu - on_cpu).abs().max()


def test_bf16_training_on_cuda_brings_the_loss_down():
    model = tiny_model().cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 13, (8, 17), generator=torch.Generator().manual_seed(0)).cuda()
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_compiled_model_gives_the_eager_logits_on_cuda():
    model = random_model("rope").cuda()
    idx = torch.randint(0, len(VOCAB), (2, 24), device="cuda")
    with torch.no_grad():
        eager = model(idx)
        compiled = torch.compile(model)(idx)
    assert torch.allclose(compiled, eager, atol=1e-4)


@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_greedy_text_with_and_without_the_cache_on_cuda(pe):
    model, tok = random_model(pe).cuda(), CharTokenizer(VOCAB)
    kwargs = dict(prompt="To be", max_new_tokens=19, temperature=0)  # fills the context (24) exactly
    assert generate(model, tok, exact=True, **kwargs) == generate(model, tok, kv_cache=False, **kwargs)


def test_batched_muon_on_cuda_steps_as_torchs_per_matrix_muon():
    from lm.optim import BatchedMuon

    hidden = [parameter_groups(tiny_model().cuda())[0]["params"] for _ in range(2)]
    settings = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    optimizers = [torch.optim.Muon(hidden[0], **settings), BatchedMuon(hidden[1], **settings)]
    for step in range(3):
        for params in hidden:
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i)).cuda()
        for optimizer in optimizers:
            optimizer.step()
    for theirs, ours in zip(*hidden, strict=True):
        assert torch.allclose(theirs, ours, atol=1e-4)
    assert MuonWithAdamW(parameter_groups(tiny_model().cuda())).newton_schulz_dtype == "bfloat16"


def test_resume_on_cuda_is_exact(tmp_path, corpus):
    common = [
        f"data.path={corpus}",
        *FAST,
        "trainer.accelerator=gpu",
        "model.dropout=0.1",
        "trainer.log_every_n_steps=1",
    ]
    common += ["lr_schedule.total_steps=20"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_train([*common, "trainer.max_steps=20"], straight)
    run_train([*common, "trainer.max_steps=10"], split)
    run_train([*common, "trainer.max_steps=20", f"resume={only_run(split / 'outputs')}"], split)
    a, b = only_run(straight / "outputs"), only_run(split / "outputs")
    assert last_checkpoint(a)["global_step"] == last_checkpoint(b)["global_step"] == 20
    # (CUDA kernels may add in another order from run to run: equal to rounding, not bit for bit)
    assert csv_column(a, "train/loss")[-10:] == pytest.approx(csv_column(b, "train/loss")[-10:], abs=1e-3)


@pytest.mark.parametrize("pe", ["rope", "alibi", "learned"])
def test_the_graph_captured_step_gives_the_eager_steps_text_on_cuda(pe):
    # compile=True on CUDA captures the one-character step as a CUDA graph (mode="reduce-overhead"); past twice the
    # context (24) the cache slides and is rewound (rope, alibi) or rebuilt (learned)
    model, tok = random_model(pe).cuda(), CharTokenizer(VOCAB)
    kwargs = dict(prompt="To be", max_new_tokens=60, temperature=0, exact=True)
    assert generate(model, tok, compile=True, **kwargs) == generate(model, tok, **kwargs)
    several = dict(kwargs, num_samples=8, temperature=1.0, seed=0)
    assert generate(model, tok, compile=True, **several) == generate(model, tok, **several)


def test_the_benchmark_on_cuda_compiles_both_projects_and_samples_through_the_captured_step(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "bench.json"
    parts = ["--only", "train,reference,generate", "--presets", "tiny", "--steps", "3", "--warmup", "2"]
    cmd = [sys.executable, str(root / "scripts" / "benchmark.py"), *parts, "--generate-chars", "50", "--out", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    (training,) = report["training"]  # bf16-mixed only: what runs use on a GPU
    assert training["precision"] == "bf16-mixed" and training["compiled"] and training["peak_gpu_mb"] > 0
    (reference,) = report["reference"]
    assert reference["compiled"] and reference["nanogpt_bf16_ms"] > 0
    (generation,) = report["generation"]
    assert generation["streams_compiled"] and generation["chars_per_s_8_streams"] > 0


MODERN = dict(norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False, logit_softcap=30.0)


@pytest.mark.parametrize("options", [MODERN, dict(norm_position="post", mlp="swiglu")], ids=["modern", "post_swiglu"])
@pytest.mark.parametrize("pe", POSITIONAL_ENCODINGS)
def test_the_blocks_techniques_on_cuda_give_the_cpus_logits_and_gradients_eager_and_compiled(pe, options):
    # on CUDA the options run as PyTorch composites (compiled: fused by Inductor); on a CPU as lm/fused.py's passes
    torch.manual_seed(0)
    config = TransformerConfig(
        vocab_size=40, seq_length=64, n_layer=2, n_head=4, n_embd=64, pos_encoding={"name": pe}, **options
    )
    model = Transformer(config)
    idx = torch.randint(0, 40, (3, 64), generator=torch.Generator().manual_seed(1))
    cpu_logits = model(idx)
    cpu_logits.square().mean().backward()
    cpu_grad = model.blocks[0].mlp.fc.weight.grad.clone()
    model = model.cuda()
    for forward in (model, torch.compile(model)):
        model.zero_grad()
        logits = forward(idx.cuda())
        logits.square().mean().backward()
        assert torch.allclose(logits.cpu(), cpu_logits, atol=1e-3)
        assert torch.allclose(model.blocks[0].mlp.fc.weight.grad.cpu(), cpu_grad, rtol=1e-2, atol=1e-5)
    tok = CharTokenizer("".join(chr(ord("a") + i) for i in range(26)) + " .,;:!?'-ABCDEFGHIJKLM"[:14])
    kwargs = dict(prompt="abc", max_new_tokens=30, temperature=0)
    assert generate(model.eval(), tok, exact=True, **kwargs) == generate(model, tok, kv_cache=False, **kwargs)


LENGTH_OPTIONS = {
    "gqa1": dict(n_kv_head=1),
    "window_sinks_gqa2": dict(attention_window=16, attention_sinks=2, n_kv_head=2),
    "yarn_partial": dict(
        pos_encoding={"name": "rope", "scaling": "yarn", "scaling_factor": 4.0, "rotary_fraction": 0.5}
    ),
}


@pytest.mark.parametrize("option", LENGTH_OPTIONS)
@pytest.mark.parametrize("pe", ["rope", "t5", "xpos", "fire"])
def test_the_length_options_on_cuda_give_the_cpus_logits_and_the_graph_captured_steps_text(pe, option):
    settings = dict(LENGTH_OPTIONS[option])
    if "pos_encoding" in settings and pe != "rope":
        pytest.skip("a context extension is RoPE's")
    settings.setdefault("pos_encoding", {"name": pe})
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=len(VOCAB), seq_length=24, n_layer=2, n_head=4, n_embd=64, **settings)
    model = Transformer(config).eval()
    idx = torch.randint(0, len(VOCAB), (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        on_cpu = model(idx)
        on_gpu = model.cuda()(idx.cuda()).cpu()
    assert torch.allclose(on_gpu, on_cpu, atol=1e-3), (on_gpu - on_cpu).abs().max()
    tok = CharTokenizer(VOCAB)
    kwargs = dict(prompt="To be", max_new_tokens=60, temperature=0, exact=True)  # past the window and the context
    assert generate(model, tok, compile=True, **kwargs) == generate(model, tok, **kwargs)
    short = dict(kwargs, max_new_tokens=19)
    assert generate(model, tok, **short) == generate(model, tok, kv_cache=False, **short)
