"""RWP gradients against lambda·g1 + (1 - lambda)·g0 with the noise materialised by hand, both scopes."""

import copy
import math

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels.noise import layer_seed

from .helpers import batches, bitwise_equal, grads_at, loss_on, snapshot, tiny_peft, trainable


def factor_noise_by_hand(model, sigma, seed, sample=0):
    """e for every LoRA factor: row i ~ N(0, (sigma·||row_i||)²/n) from generator layer_seed(seed, sample, k, 0)."""
    noise = {}
    for k, (name, p) in enumerate(trainable(model).items()):
        gen = torch.Generator().manual_seed(layer_seed(seed, sample, k, 0))
        z = torch.randn(p.shape, generator=gen).double()
        noise[name] = p.detach().double().norm(dim=1, keepdim=True) * sigma / math.sqrt(p.shape[1]) * z
    return noise


def mix(lam, noisy, clean_grads):
    return {n: lam * noisy[n] + (1 - lam) * clean_grads[n] for n in noisy}


def assert_grads(model, expected, rtol):
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.grad.double(), expected[name].double(), rtol=rtol, atol=rtol * 1e-2, msg=name)


@pytest.mark.parametrize("two_batches", [False, True], ids=["one_batch", "two_batches"])
def test_lora_scope_mixed_gradient(two_batches):
    model, (b1, b2) = tiny_peft(), batches(2)
    lam, sigma, seed = 0.3, 0.4, 11
    rwp = fk.RWP(model, sigma=sigma, lam=lam, scope="lora", seed=seed)
    eps = factor_noise_by_hand(model, sigma, seed)
    assert list(rwp.factors) == list(eps)
    for mine, theirs in zip(rwp.factor_noise(), eps.values()):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=0)
    clean = b2 if two_batches else b1
    expected = mix(lam, grads_at(model, b1, eps), grads_at(model, clean))
    before = snapshot(model)
    if two_batches:
        rwp.two_batch(lambda: loss_on(model, b1), lambda: loss_on(model, b2))
    else:
        rwp.accumulate(lambda: loss_on(model, b1))
    assert_grads(model, expected, rtol=1e-12)
    assert bitwise_equal(snapshot(model), before)


def test_lora_scope_accumulation_window():
    """N = 3: (1 - lam)/2 · (g(B1) + g(B2)) clean, lam · g(B3 at theta + e) noisy."""
    model, data = tiny_peft(), batches(3)
    lam, sigma = 0.6, 0.3
    rwp = fk.RWP(model, sigma=sigma, lam=lam, scope="lora", seed=2)
    eps = factor_noise_by_hand(model, sigma, 2)
    clean = [grads_at(model, b) for b in data[:2]]
    expected = mix(lam, grads_at(model, data[2], eps), {n: (clean[0][n] + clean[1][n]) / 2 for n in eps})
    for k, batch in enumerate(data):
        rwp.accumulate(lambda: loss_on(model, batch), last=k == 2, window=3)
    assert_grads(model, expected, rtol=1e-12)


def merged_reference(model, ctl, batch, noisy):
    """float64 gradients with W + c·Z materialised in the base weights (or clean)."""
    clone = copy.deepcopy(model).double()
    for layer in clone.modules():
        if isinstance(layer, fk.FlatLoraLinear):
            layer.clear_noise()  # the clone is plain LoRA: the noise goes into W by hand
    if noisy:
        with torch.no_grad():
            for name, layer in ctl.layers.items():
                m, n = layer.logical_weight().shape
                clone.get_submodule(name).base_layer.weight += (
                    layer.noise_row_std.double()[:, None] * fk.generate_noise(layer.noise_seed, m, n).double())
    loss_on(clone, tuple(t.double() for t in batch)).backward()
    return {n: p.grad for n, p in trainable(clone).items()}


@pytest.mark.parametrize("two_batches", [False, True], ids=["one_batch", "two_batches"])
def test_merged_scope_mixed_gradient(two_batches):
    model = tiny_peft(dtype=torch.float32)
    b1, b2 = batches(2, dtype=torch.float32)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    lam = 0.7
    rwp = fk.RWP(model, sigma=0.5, lam=lam, scope="merged", seed=3)
    ctl = rwp.controller
    clean = b2 if two_batches else b1
    expected = mix(lam, merged_reference(model, ctl, b1, True), merged_reference(model, ctl, clean, False))
    if two_batches:
        rwp.two_batch(lambda: loss_on(model, b1), lambda: loss_on(model, b2))
    else:
        rwp.accumulate(lambda: loss_on(model, b1))
    assert_grads(model, expected, rtol=2e-5)
    # the noise mattered (the test can fail) and no frozen weight moved
    plain = merged_reference(model, ctl, b1, False)
    assert any((plain[n] - expected[n]).abs().max() > 1e-4 for n in plain)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_noise_disabled_restores_the_exact_sample():
    model = tiny_peft(dtype=torch.float32)
    ctl = fk.apply_flat_lora(model, sigma=0.3, schedule="constant", seed=1)
    state = [(layer.noise_seed, layer.noise_row_std) for layer in ctl.layers.values()]
    with pytest.raises(KeyError):
        with ctl.noise_disabled():
            assert not any(layer.noise_active for layer in ctl.layers.values())
            with ctl.noise_disabled():
                pass
            raise KeyError("inside")
    assert [(layer.noise_seed, layer.noise_row_std) for layer in ctl.layers.values()] == state
    assert all(layer.noise_row_std is row_std for layer, (_, row_std) in zip(ctl.layers.values(), state))


def test_reproducible_bitwise_restore_and_rng_untouched():
    data = batches(3, dtype=torch.float32)
    model = tiny_peft(dtype=torch.float32)
    before = snapshot(model)
    rng = torch.get_rng_state()
    rwp = fk.RWP(model, sigma=0.3, scope="lora", seed=5)
    first = rwp.factor_noise()
    for step in range(40):
        rwp.accumulate(lambda: loss_on(model, data[step % 3]))
        rwp.step()
    assert bitwise_equal(snapshot(model), before) and torch.equal(torch.get_rng_state(), rng)
    again = fk.RWP(tiny_peft(dtype=torch.float32), sigma=0.3, scope="lora", seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first, again.factor_noise()))
    again.load_state_dict(rwp.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(rwp.factor_noise(), again.factor_noise()))
    assert not torch.equal(first[0], rwp.factor_noise()[0])


def test_rwp_errors():
    model = tiny_peft(dtype=torch.float32)
    for lam in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="lam"):
            fk.RWP(model, lam=lam, scope="lora")
    with pytest.raises(ValueError, match="sigma"):
        fk.RWP(model, sigma=-0.1, scope="lora")
    with pytest.raises(ValueError, match="scope"):
        fk.RWP(model, scope="full")
    with pytest.raises(TypeError, match="not both"):
        fk.RWP(model, fk.FlatLoraConfig(), sigma=0.1)
    rwp = fk.RWP(model, scope="lora")
    with pytest.raises(ValueError, match="seed"):
        rwp.load_state_dict({**rwp.state_dict(), "seed": 9})
