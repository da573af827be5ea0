"""SAM, ASAM and LoRA-SAM against the two-pass formula written out in float64."""

import math

import pytest
import torch

import flatlora_kernels as fk

from .helpers import batches, bitwise_equal, grads_at, loss_on, snapshot, tiny_peft, trainable


def expected_perturbation(model, grads, rho, adaptive, per_tensor):
    """e by the formula: rho * T²g / ||T g|| with T = |theta| (ASAM) or 1 (SAM), norms global or per tensor."""
    theta = {n: p.detach() for n, p in trainable(model).items()}
    scaled = {n: grads[n] * theta[n].abs() if adaptive else grads[n] for n in grads}
    total = math.sqrt(sum(float(s.square().sum()) for s in scaled.values()))
    return {n: rho * (scaled[n] * theta[n].abs() if adaptive else scaled[n])
            / (float(scaled[n].norm()) if per_tensor else total) for n in grads}


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
@pytest.mark.parametrize("per_tensor", [False, True], ids=["global", "per_tensor"])
def test_sam_step_equals_two_pass_formula(adaptive, per_tensor):
    model, (batch,) = tiny_peft(), batches(1)
    rho, lr = 0.3, 0.1
    g0 = grads_at(model, batch)
    eps = expected_perturbation(model, g0, rho, adaptive, per_tensor)
    g1 = grads_at(model, batch, eps)
    expected = {n: p.detach() - lr * g1[n] for n, p in trainable(model).items()}

    opt = fk.SAM(trainable(model).values(), torch.optim.SGD, rho=rho, adaptive=adaptive, per_tensor=per_tensor, lr=lr)
    loss_on(model, batch).backward()
    opt.first_step(zero_grad=True)
    moved = {n: p.detach().clone() for n, p in trainable(model).items()}
    loss_on(model, batch).backward()
    opt.second_step(zero_grad=True)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-12, atol=1e-12, msg=name)
    # the perturbation itself, and its normalisation: each tensor at radius rho, or all of them together
    shift = {n: moved[n] - (expected[n] + lr * g1[n]) for n in moved}
    for name in shift:
        torch.testing.assert_close(shift[name], eps[name], rtol=1e-10, atol=1e-12, msg=name)
    scaled = {n: shift[n] / trainable(model)[n].detach().abs() if adaptive else shift[n] for n in shift}
    if not adaptive:
        norms = [float(s.norm()) for s in scaled.values()]
        if per_tensor:
            assert all(abs(x - rho) < 1e-9 for x in norms)
        else:
            assert abs(math.sqrt(sum(x * x for x in norms)) - rho) < 1e-9 and all(x < rho - 1e-6 for x in norms)


def test_step_with_closure_matches_first_and_second_step():
    (batch,) = batches(1)
    results = []
    for use_closure in (False, True):
        model = tiny_peft()
        opt = fk.SAM(trainable(model).values(), torch.optim.AdamW, rho=0.1, lr=1e-2)
        for _ in range(3):
            loss_on(model, batch).backward()
            if use_closure:
                opt.step(lambda: loss_on(model, batch).backward())
                opt.zero_grad()
            else:
                opt.first_step(zero_grad=True)
                loss_on(model, batch).backward()
                opt.second_step(zero_grad=True)
        results.append(snapshot(model))
    assert bitwise_equal(*results)


def test_restore_is_bitwise_after_many_steps_and_rng_untouched():
    model = tiny_peft(dtype=torch.float32)
    before = snapshot(model)
    data = batches(4, dtype=torch.float32)
    rng = torch.get_rng_state()
    opt = fk.SAM(trainable(model).values(), torch.optim.SGD, rho=0.5, adaptive=True, lr=0.0)
    for i in range(60):
        loss_on(model, data[i % 4]).backward()
        opt.first_step(zero_grad=True)
        assert not torch.equal(trainable(model)["base_model.model.fc1.lora_A.default.weight"],
                               before["base_model.model.fc1.lora_A.default.weight"])
        loss_on(model, data[i % 4]).backward()
        opt.second_step(zero_grad=True)
    assert bitwise_equal(snapshot(model), before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_state_dict_round_trip_continues_bitwise():
    data = batches(4)

    def run(model, opt, steps):
        for batch in steps:
            loss_on(model, batch).backward()
            opt.step(lambda: loss_on(model, batch).backward())
            opt.zero_grad()

    model = tiny_peft()
    opt = fk.SAM(trainable(model).values(), torch.optim.AdamW, rho=0.2, per_tensor=True, lr=1e-2)
    run(model, opt, data)
    straight = snapshot(model)

    model = tiny_peft()
    opt = fk.SAM(trainable(model).values(), torch.optim.AdamW, rho=0.2, per_tensor=True, lr=1e-2)
    run(model, opt, data[:2])
    state, weights = opt.state_dict(), snapshot(model)
    assert state["param_groups"][0]["rho"] == 0.2
    model = tiny_peft()
    model.load_state_dict(weights)
    opt = fk.SAM(trainable(model).values(), torch.optim.AdamW, rho=0.2, per_tensor=True, lr=1e-2)
    opt.load_state_dict(state)
    run(model, opt, data[2:])
    assert bitwise_equal(snapshot(model), straight)


def test_accumulation_window_formula():
    """N micro-batches: e from the mean gradient of the window, second pass on the last micro-batch only."""
    model, data = tiny_peft(), batches(3)
    rho = 0.25
    grads = [grads_at(model, b) for b in data]
    mean = {n: sum(g[n] for g in grads) / 3 for n in grads[0]}
    eps = expected_perturbation(model, mean, rho, adaptive=False, per_tensor=False)
    expected = grads_at(model, data[-1], eps)
    before = snapshot(model)
    sam = fk.SAMPerturber(trainable(model).values(), rho=rho)
    for k, batch in enumerate(data):
        sam.accumulate(lambda: loss_on(model, batch), last=k == 2, window=3)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-12, atol=1e-12, msg=name)
    assert bitwise_equal(snapshot(model), before)


def test_errors_name_the_problem():
    model, (batch,) = tiny_peft(), batches(1)
    params = list(trainable(model).values())
    before = snapshot(model)
    for rho in (0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="rho"):
            fk.SAM(params, torch.optim.SGD, rho=rho, lr=0.1)
    with pytest.raises(ValueError, match="on_nonfinite"):
        fk.SAMPerturber(params, on_nonfinite="ignore")
    opt = fk.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="without a first step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no gradients"):
        opt.first_step()
    loss_on(model, batch).backward()
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="first_step called twice"):
        opt.first_step()
    with pytest.raises(RuntimeError, match="between first_step and second_step"):
        opt.state_dict()
    with pytest.raises(RuntimeError, match="no gradient in the second pass"):
        opt.second_step()  # the second backward was never run
    loss_on(model, batch).backward()
    with pytest.raises(KeyError):  # a failing second pass still restores theta, bit for bit
        with fk.SAMPerturber(params).perturbed():
            raise KeyError("second pass")
    assert bitwise_equal(snapshot(model), before)
    with pytest.raises(ValueError, match="window"):
        fk.SAMPerturber(params).accumulate(lambda: loss_on(model, batch), window=0)


def test_nonfinite_gradient_raises_or_skips():
    model, (batch,) = tiny_peft(), batches(1)
    params = list(trainable(model).values())
    before = snapshot(model)
    opt = fk.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1)
    loss_on(model, batch).backward()
    params[0].grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.first_step()
    opt = fk.SAM(params, torch.optim.SGD, rho=0.1, lr=0.1, on_nonfinite="skip")
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step(lambda: loss_on(model, batch).backward())
    assert bitwise_equal(snapshot(model), before) and all(p.grad is None for p in params)
