"""Parameter routing and Muon + AdamW as one optimizer."""

import copy
import math

import pytest
import torch
from helpers import loss_of, tiny_model

from lm.errors import ConfigError
from lm.optim import HIDDEN_MATRICES, MuonWithAdamW, parameter_groups


def test_parameters_are_routed_by_module_not_shape():
    model = tiny_model()
    groups = {g["name"]: g["params"] for g in parameter_groups(model)}
    ids = {name: {id(p) for p in params} for name, params in groups.items()}
    hidden = {id(m.weight) for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj)}
    assert ids[HIDDEN_MATRICES] == hidden
    # the tied embedding / output head is 2-D but is not a hidden matrix
    assert id(model.token_embedding.weight) in ids["embeddings"] and id(model.position.weight) in ids["embeddings"]
    assert all(p.dim() == 1 for p in groups["vectors"])
    assert sum(len(v) for v in ids.values()) == len(list(model.parameters()))


def test_muon_with_adamw_is_one_optimizer_that_trains_and_resumes_exactly():
    model = tiny_model()
    optimizer = MuonWithAdamW(parameter_groups(model), lr=1e-2)
    assert isinstance(optimizer.muon, torch.optim.Muon) and isinstance(optimizer.adamw, torch.optim.AdamW)
    assert [g["name"] for g in optimizer.muon.param_groups] == [HIDDEN_MATRICES]
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # one scheduler drives both halves
    assert optimizer.muon.param_groups[0]["lr"] == optimizer.adamw.param_groups[0]["lr"] == 5e-3
    batch = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(0))

    def step(model, optimizer):
        optimizer.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()

    losses = [step(model, optimizer) for _ in range(5)]
    assert losses[-1] < losses[0]
    assert "momentum_buffer" in optimizer.state[model.blocks[0].mlp.fc.weight]  # Muon's state
    assert "exp_avg" in optimizer.state[model.token_embedding.weight]  # AdamW's state

    # resume: a copy restored from the state dicts takes the very same next steps
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    expected = [step(model, optimizer) for _ in range(3)]
    restored = tiny_model()
    restored.load_state_dict(saved_model)
    restored_opt = MuonWithAdamW(parameter_groups(restored), lr=1e-2)
    restored_opt.load_state_dict(saved_opt)
    assert (
        restored_opt.muon.state is restored_opt.state
        and restored_opt.adamw.param_groups[0] in restored_opt.param_groups
    )
    assert [step(restored, restored_opt) for _ in range(3)] == pytest.approx(expected, abs=1e-6)
    del schedule


def test_muon_refuses_parameters_without_roles():
    with pytest.raises(ConfigError, match="hidden_matrices"):
        MuonWithAdamW(tiny_model().parameters())


def test_the_embeddings_take_their_own_lr_which_the_schedule_scales_like_the_rest():
    model = tiny_model()
    optimizer = MuonWithAdamW(parameter_groups(model), lr=1e-2, embedding_lr=3e-2)
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {HIDDEN_MATRICES: 1e-2, "embeddings": 3e-2, "vectors": 1e-2}
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    assert {g["name"]: g["lr"] for g in optimizer.adamw.param_groups} == {"embeddings": 1.5e-2, "vectors": 5e-3}
    # against the plain reference: AdamW's step on the embedding at lr 3e-2 is what the combined optimizer takes
    reference = copy.deepcopy(model)
    plain = torch.optim.AdamW([reference.token_embedding.weight], lr=1.5e-2, weight_decay=0.1, betas=(0.9, 0.99))
    batch = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(0))
    for m, opt in ((model, optimizer), (reference, plain)):
        opt.zero_grad()
        loss_of(m, batch).backward()
        opt.step()
    assert torch.allclose(model.token_embedding.weight, reference.token_embedding.weight, atol=1e-7)
    for bad in (0, -1e-2, True, "fast"):
        with pytest.raises(ConfigError, match="optimizer.embedding_lr="):
            MuonWithAdamW(parameter_groups(tiny_model()), embedding_lr=bad)


def test_batched_newton_schulz_matches_torchs_per_matrix_iteration():
    import torch.optim._muon as torch_muon

    from lm.optim import newton_schulz

    coefficients = (3.4445, -4.775, 2.0315)
    for shape in [(48, 16), (16, 48), (32, 32)]:
        stack = torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
        expected = torch.stack([torch_muon._zeropower_via_newtonschulz(g, coefficients, 5, 1e-7) for g in stack])
        in_bf16 = newton_schulz(stack, coefficients, 5, 1e-7, torch.bfloat16)
        in_fp32 = newton_schulz(stack, coefficients, 5, 1e-7, torch.float32)
        assert in_bf16.shape == in_fp32.shape == (3, *shape)
        assert torch.allclose(in_bf16.float(), expected.float(), atol=0.02)
        assert torch.allclose(in_fp32, expected.float(), atol=0.03)
        # each matrix of the stack as if it were alone: no mixing across the batch
        alone = torch.stack([newton_schulz(g[None], coefficients, 5, 1e-7, torch.float32)[0] for g in stack])
        assert torch.allclose(in_fp32, alone, atol=1e-5)


@pytest.mark.parametrize("polar_express", [False, True])
@pytest.mark.parametrize("ns_steps", [1, 5])
def test_gram_iteration_gives_the_plain_iteration_for_wide_and_tall_stacks(monkeypatch, polar_express, ns_steps):
    from lm import optim

    calls, gram = [], optim.gram_newton_schulz
    monkeypatch.setattr(optim, "gram_newton_schulz", lambda x, c: calls.append(x.shape) or gram(x, c))
    coefficients = (3.4445, -4.775, 2.0315)
    for shape in [(3, 16, 48), (3, 48, 16), (2, 16, 32)]:
        stack = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        with_gram = optim.newton_schulz(stack, coefficients, ns_steps, 1e-7, torch.float32, polar_express)
        monkeypatch.setattr(optim, "GRAM_ITERATION_MIN_ASPECT", 10**9)
        plain = optim.newton_schulz(stack, coefficients, ns_steps, 1e-7, torch.float32, polar_express)
        monkeypatch.setattr(optim, "GRAM_ITERATION_MIN_ASPECT", 2)
        assert torch.allclose(with_gram, plain, atol=1e-5), (with_gram - plain).abs().max()
    assert calls == [(3, 16, 48), (3, 16, 48), (2, 16, 32)]  # taken for each stack once, on its wide side
    square = torch.randn((2, 16, 16), generator=torch.Generator().manual_seed(2))
    optim.newton_schulz(square, coefficients, ns_steps, 1e-7, torch.float32)
    optim.newton_schulz(stack, coefficients, ns_steps, 1e-7, torch.bfloat16)
    assert len(calls) == 3  # not for square matrices, nor in bf16


def test_batched_muon_steps_as_torchs_muon_and_shares_its_state():
    from lm.optim import BatchedMuon

    models = [tiny_model(), tiny_model()]
    hidden = [parameter_groups(m)[0]["params"] for m in models]
    settings = dict(lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    optimizers = [torch.optim.Muon(hidden[0], **settings), BatchedMuon(hidden[1], **settings)]
    for step in range(3):
        for params in hidden:
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
        for optimizer in optimizers:
            optimizer.step()
    for theirs, ours in zip(*hidden, strict=True):
        assert torch.allclose(theirs, ours, atol=1e-4), (theirs - ours).abs().max()
    state_theirs, state_ours = (o.state_dict() for o in optimizers)
    assert state_theirs["param_groups"] == state_ours["param_groups"]
    for i, state in state_theirs["state"].items():
        assert torch.allclose(state["momentum_buffer"], state_ours["state"][i]["momentum_buffer"], atol=1e-6)
    torch.optim.Muon(hidden[0], **settings).load_state_dict(state_ours)  # each loads the other's checkpoint


def test_muon_steps_agree_whichever_dtype_orthogonalises():
    batch = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(0))
    weights = []
    for dtype in ("bfloat16", "float32"):
        model = tiny_model()
        optimizer = MuonWithAdamW(parameter_groups(model), lr=1e-2, newton_schulz_dtype=dtype)
        loss_of(model, batch).backward()
        optimizer.step()
        weights.append(model.blocks[0].mlp.fc.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-3) and not torch.equal(weights[0], weights[1])
    assert MuonWithAdamW(parameter_groups(tiny_model())).newton_schulz_dtype in ("bfloat16", "float32")


def reference_polar_express(matrix: torch.Tensor, steps: int) -> torch.Tensor:
    """Polar Express written out for one matrix, in float64, as modded-nanogpt's loop runs it."""
    from lm.optim import POLAR_EXPRESS_COEFFICIENTS

    x = matrix.double()
    wide = x.T if x.size(0) > x.size(1) else x
    wide = wide / (wide.norm() * 1.02 + 1e-7)
    for a, b, c in POLAR_EXPRESS_COEFFICIENTS[:steps]:
        gram = wide @ wide.T
        wide = a * wide + (b * gram + c * gram @ gram) @ wide
    return wide.T if x.size(0) > x.size(1) else wide


def test_polar_express_matches_its_reference_and_orthogonalises_closer_than_newton_schulz():
    from lm.optim import newton_schulz

    coefficients = (3.4445, -4.775, 2.0315)
    for shape in [(48, 16), (16, 48), (32, 32)]:
        stack = torch.randn((3, *shape), generator=torch.Generator().manual_seed(0))
        ours = newton_schulz(stack, coefficients, 5, 1e-7, torch.float32, polar_express=True)
        expected = torch.stack([reference_polar_express(g, 5) for g in stack]).float()
        assert torch.allclose(ours, expected, atol=1e-4), (ours - expected).abs().max()
        # singular values: torch's quintic leaves them anywhere in ~[0.7, 1.2]; Polar Express brings them nearer 1
        plain = newton_schulz(stack, coefficients, 5, 1e-7, torch.float32)
        spread = [(torch.linalg.svdvals(x.double()) - 1).abs().max().item() for x in (ours, plain)]
        assert spread[0] < spread[1] and spread[0] < 0.25, spread
        # fewer steps take the first coefficients
        three = newton_schulz(stack, coefficients, 3, 1e-7, torch.float32, polar_express=True)
        assert torch.allclose(three, torch.stack([reference_polar_express(g, 3) for g in stack]).float(), atol=1e-4)


def reference_normuon(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon for one (rows >= cols) matrix, row by row: divide each row by the root of its running mean square,
    then restore the matrix's norm."""
    rows = update.double()
    mean_square = (rows**2).mean(dim=1)
    second_moment.mul_(beta2).add_((1 - beta2) * mean_square)
    scaled = rows / second_moment.clamp(min=1e-10).sqrt()[:, None]
    return (scaled * rows.norm() / scaled.norm()).float()


def muon_refinement_step(param: torch.Tensor, grad: torch.Tensor, **refinements):
    from lm.optim import BatchedMuon

    optimizer = BatchedMuon(
        [param], lr=0.1, weight_decay=0.5, momentum=0.0, nesterov=False, adjust_lr_fn="match_rms_adamw",
        newton_schulz_dtype=torch.float32,
        **refinements,
    )  # fmt: skip
    param.grad = grad
    optimizer.step()
    return optimizer


def test_normuon_scales_each_neuron_by_its_running_second_moment_and_keeps_it_in_the_state():
    from lm.optim import newton_schulz

    generator = torch.Generator().manual_seed(0)
    start, grads = torch.randn(24, 8, generator=generator), [torch.randn(24, 8, generator=generator) for _ in range(3)]
    param = start.clone().requires_grad_()
    optimizer = None
    expected, moment = start.clone(), torch.zeros(24, dtype=torch.float64)
    for grad in grads:
        if optimizer is None:
            optimizer = muon_refinement_step(param, grad.clone(), normuon_beta2=0.9)
        else:
            param.grad = grad.clone()
            optimizer.step()
        orthogonal = newton_schulz(grad[None], (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)[0]
        update = reference_normuon(orthogonal, moment, 0.9)
        expected = expected * (1 - 0.1 * 0.5) - 0.1 * 0.2 * math.sqrt(24) * update  # match_rms_adamw
        assert torch.allclose(param.detach(), expected, atol=1e-5), (param.detach() - expected).abs().max()
    saved = optimizer.state_dict()["state"][0]["normuon_second_moment"]
    assert saved.shape == (24, 1) and torch.allclose(saved[:, 0].double(), moment, atol=1e-6)


def test_cautious_weight_decay_decays_only_where_the_update_shrinks_the_weight():
    from lm.optim import newton_schulz

    generator = torch.Generator().manual_seed(1)
    start, grad = torch.randn(16, 16, generator=generator), torch.randn(16, 16, generator=generator)
    param = start.clone().requires_grad_()
    muon_refinement_step(param, grad.clone(), cautious_weight_decay=True)
    update = newton_schulz(grad[None], (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32)[0]
    agree = (start * update) >= 0
    expected = torch.where(agree, start * (1 - 0.05), start) - 0.1 * 0.2 * 4 * update
    assert torch.allclose(param.detach(), expected, atol=1e-6)
    assert 0 < agree.sum() < agree.numel()  # both cases occur


def test_momentum_warmup_steps_as_muon_with_each_steps_momentum_set_by_hand():
    batch = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(0))
    warmed, by_hand = tiny_model(), tiny_model()
    by_hand.load_state_dict(warmed.state_dict())
    ours = MuonWithAdamW(parameter_groups(warmed), lr=1e-2, momentum_warmup_steps=4, momentum_warmup_start=0.5)
    reference = MuonWithAdamW(parameter_groups(by_hand), lr=1e-2)
    hidden = next(g for g in reference.param_groups if g["name"] == HIDDEN_MATRICES)
    expected = [0.5, 0.6125, 0.725, 0.8375, 0.95, 0.95]  # 0.5 + t/4 x (0.95 - 0.5), then 0.95
    for momentum in expected:
        assert ours.muon.momentum_at(ours.muon.param_groups[0]) == pytest.approx(momentum)
        hidden["momentum"] = momentum
        for model, optimizer in ((warmed, ours), (by_hand, reference)):
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
        for a, b in zip(warmed.parameters(), by_hand.parameters(), strict=True):
            assert torch.equal(a, b)
    saved = next(g for g in ours.state_dict()["param_groups"] if g["name"] == HIDDEN_MATRICES)
    assert saved["muon_steps"] == 6  # saved with the optimizer


def test_muon_refinements_train_and_resume_exactly():
    batch = torch.randint(0, 13, (4, 17), generator=torch.Generator().manual_seed(0))
    refinements = dict(
        orthogonalizer="polar_express", normuon_beta2=0.95, cautious_weight_decay=True, momentum_warmup_steps=3
    )

    def steps(model, optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            optimizer.step()
        return loss.item()

    model = tiny_model()
    optimizer = MuonWithAdamW(parameter_groups(model), lr=1e-2, **refinements)
    first = steps(model, optimizer, 1)
    state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    last = steps(model, optimizer, 5)
    assert last < first
    restored = tiny_model()
    restored.load_state_dict(state[0])
    restored_opt = MuonWithAdamW(parameter_groups(restored), lr=1e-2, **refinements)
    restored_opt.load_state_dict(state[1])
    steps(restored, restored_opt, 5)
    for ours, theirs in zip(model.parameters(), restored.parameters(), strict=True):
        assert torch.equal(ours, theirs)


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(orthogonalizer="svd"), "optimizer.orthogonalizer='svd'"),
        (dict(orthogonalizer="polar_express", ns_steps=6), "optimizer.ns_steps=6 with polar_express"),
        (dict(normuon_beta2=1.0), "optimizer.normuon_beta2=1.0"),
        (dict(normuon_beta2=True), "optimizer.normuon_beta2=True"),
        (dict(momentum_warmup_steps=-1), "optimizer.momentum_warmup_steps=-1"),
        (dict(momentum_warmup_steps=2.5), "optimizer.momentum_warmup_steps=2.5"),
        (dict(momentum_warmup_start=1.0), "optimizer.momentum_warmup_start=1.0"),
    ],
)
def test_bad_muon_refinements_are_refused_in_one_line(bad, match):
    with pytest.raises(ConfigError, match=match.replace("(", r"\(")):
        MuonWithAdamW(parameter_groups(tiny_model()), **bad)
