"""SAM on the merged weight against an explicitly materialised gradient of W' = W + s·BA."""

import copy
import math

import pytest
import torch

import flatlora_kernels as fk

from .helpers import HIDDEN, N_IN, N_OUT, batches, bitwise_equal, loss_on, snapshot, tiny_peft, trainable


def bases(model):
    return {name: m.base_layer.weight for name, m in model.named_modules() if hasattr(m, "lora_A")}


def materialised_reference(model, data, rho):
    """Gradient of A, B at W + s·BA + e_W, e_W = rho·G/||G|| with G = dL/dW' over the window (materialised)."""
    clone = copy.deepcopy(model)
    weights = bases(clone)
    for w in weights.values():
        w.requires_grad_(True)
    for batch in data:
        (loss_on(clone, batch) / len(data)).backward()
    norm = math.sqrt(sum(float(w.grad.square().sum()) for w in weights.values()))
    with torch.no_grad():
        for w in weights.values():
            w.add_(rho * w.grad / norm)
            w.grad = None
    for p in trainable(clone).values():
        p.grad = None
    loss_on(clone, data[-1]).backward()
    return {n: p.grad for n, p in trainable(clone).items()}


@pytest.mark.parametrize("window", [1, 3])
def test_merged_sam_equals_materialised_gradient(window):
    model, data = tiny_peft(), batches(window, rows=5)
    expected = materialised_reference(model, data, rho=0.4)
    before = snapshot(model)
    msam = fk.MergedSAM(model, rho=0.4)
    for k, batch in enumerate(data):
        msam.accumulate(lambda: loss_on(model, batch), last=k == window - 1, window=window)
    for name, p in trainable(model).items():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-10, atol=1e-12, msg=name)
    assert bitwise_equal(snapshot(model), before), "merged SAM wrote to a weight"
    # and e_W mattered: the clean gradient on the last batch differs
    clean = copy.deepcopy(model)
    loss_on(clean, data[-1]).backward()
    assert any((p.grad - expected[n]).abs().max() > 1e-6 for n, p in trainable(clean).items())


def test_merged_sam_holds_no_m_by_n_tensor():
    """Recorded tensors are (tokens, in) and (tokens, out); the second pass saves no (out, in) tensor
    other than the base weights themselves."""
    model, (batch,) = tiny_peft(), batches(1, rows=4)
    msam = fk.MergedSAM(model, rho=0.1)
    with msam.capture():
        loss_on(model, batch).backward()
    shapes = sorted(tuple(t.shape) for t in msam.recorded_tensors())
    assert shapes == sorted([(4, N_IN), (4, HIDDEN), (4, HIDDEN), (4, N_OUT)])
    weight_ptrs = {w.data_ptr() for w in bases(model).values()}
    forbidden = {(HIDDEN, N_IN), (N_IN, HIDDEN), (N_OUT, HIDDEN), (HIDDEN, N_OUT)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.data_ptr()))
        return t

    with msam.perturbed(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_on(model, batch).backward()
    assert saved and not [s for s, ptr in saved if s in forbidden and ptr not in weight_ptrs]


def test_merged_sam_errors():
    model, (batch,) = tiny_peft(), batches(1)
    for rho in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="rho"):
            fk.MergedSAM(model, rho=rho)
    msam = fk.MergedSAM(model)
    with pytest.raises(RuntimeError, match="recorded no gradients"):
        with msam.perturbed():
            pass
    with pytest.raises(ValueError, match="no PEFT LoRA"):
        fk.MergedSAM(torch.nn.Linear(3, 3))
    with msam.capture():
        loss = loss_on(model, batch)
        (loss * float("nan")).backward()
    with pytest.raises(FloatingPointError, match="non-finite"):
        with msam.perturbed():
            pass
