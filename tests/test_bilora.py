"""Bi-LoRA: one backward gives descent gradients at W + s·BA + B2A2 and the auxiliary ascent, clipped to rho."""

import copy
import math

import pytest
import torch

import flatlora_kernels as fk

from .helpers import batches, loss_on, snapshot, tiny_peft, trainable


def with_materialised_aux(model, bilora):
    """A copy without hooks whose base weights hold W + B2 A2 (float64)."""
    clone = copy.deepcopy(model)
    for module in clone.modules():
        module._forward_hooks.clear()
    with torch.no_grad():
        for name, (a2, b2) in bilora.pairs.items():
            clone.get_submodule(name).base_layer.weight += b2 @ a2
    return clone


def explicit_norm(bilora):
    return math.sqrt(sum(float((b.detach() @ a.detach()).square().sum()) for a, b in bilora.pairs.values()))


def test_one_step_gradients_ascent_and_clip():
    model, (batch,) = tiny_peft(), batches(1)
    rho, lr = 0.05, 0.5
    bilora = fk.BiLoRA(model, rho=1e6, ascent_lr=lr, seed=3)
    with torch.no_grad():  # a non-zero B2 so that every gradient is non-trivial
        for a2, b2 in bilora.pairs.values():
            b2.copy_(torch.linspace(-0.2, 0.3, b2.numel(), dtype=b2.dtype).reshape(b2.shape))
    reference = with_materialised_aux(model, bilora)
    aux_before = {n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in bilora.pairs.items()}
    weights = {n: m.base_layer.weight for n, m in reference.named_modules() if hasattr(m, "lora_A")}
    for w in weights.values():
        w.requires_grad_(True)
    loss_on(reference, batch).backward()

    bilora.accumulate(lambda: loss_on(model, batch))
    for name, p in trainable(model).items():  # descent gradients at the perturbed point
        torch.testing.assert_close(p.grad, trainable(reference)[name].grad, rtol=1e-12, atol=1e-14, msg=name)
    for name, (a2, b2) in bilora.pairs.items():  # ascent: dL/dA2 = B2ᵀ G, dL/dB2 = G A2ᵀ with G = dL/dW'
        a0, b0 = aux_before[name]
        g = weights[name].grad
        torch.testing.assert_close(a2.detach(), a0 + lr * b0.t() @ g, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(b2.detach(), b0 + lr * g @ a0.t(), rtol=1e-12, atol=1e-14)
        assert a2.grad is None and b2.grad is None
    # the clip: shrink to rho, measured against the materialised product
    bilora.rho = rho
    norm_before = bilora.perturbation_norm()
    explicit = explicit_norm(bilora)
    assert abs(norm_before - explicit) < 1e-12 * explicit and norm_before > rho
    bilora.accumulate(lambda: loss_on(model, batch))
    assert abs(explicit_norm(bilora) - rho) < 1e-9


def test_dropped_at_inference_and_rng_untouched():
    model, data = tiny_peft(), batches(4)
    plain = copy.deepcopy(model)
    rng = torch.get_rng_state()
    bilora = fk.BiLoRA(model, rho=0.1, ascent_lr=1.0)
    opt = torch.optim.SGD(trainable(model).values(), lr=0.0)
    for batch in data:
        bilora.accumulate(lambda: loss_on(model, batch))
        opt.step()
        opt.zero_grad()
    assert torch.equal(torch.get_rng_state(), rng)
    assert 0 < bilora.perturbation_norm() <= 0.1 + 1e-12
    x = data[0][0]
    assert not torch.equal(model(x), plain(x)), "the pair acts in training"
    model.eval()
    assert torch.equal(model(x), plain.eval()(x)), "eval mode is plain LoRA"
    model.train()
    bilora.remove()
    assert torch.equal(model(x), plain.train()(x)), "remove() drops the pair"
    assert snapshot(model).keys() == snapshot(plain).keys(), "the pair is not a model parameter"


def test_state_dict_and_errors():
    model, (batch,) = tiny_peft(), batches(1)
    bilora = fk.BiLoRA(model, rho=0.1, seed=1)
    bilora.accumulate(lambda: loss_on(model, batch))
    other = fk.BiLoRA(tiny_peft(), rho=0.1, seed=2)
    other.load_state_dict(bilora.state_dict())
    assert all(torch.equal(p, q) for p, q in zip(bilora.parameters(), other.parameters()))
    for kwargs in ({"rho": 0}, {"rho": -1}, {"ascent_lr": 0}, {"rank": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            fk.BiLoRA(tiny_peft(), **kwargs)
    with pytest.raises(RuntimeError, match="no gradient"):
        fk.BiLoRA(tiny_peft()).ascent_step()
