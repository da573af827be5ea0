"""A tiny PEFT MLP and float64 helpers for the sharpness-aware tests."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model

N_IN, HIDDEN, N_OUT = 7, 11, 5


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(N_IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, N_OUT)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def tiny_peft(dtype=torch.float64, seed=0, rank=3):
    """A PEFT-wrapped MLP (LoRA on both layers, random non-zero B) in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    mlp = MLP()
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model = get_peft_model(mlp, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.to(dtype)


def batches(count, dtype=torch.float64, rows=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, N_IN, generator=gen).to(dtype), torch.randn(rows, N_OUT, generator=gen).to(dtype))
            for _ in range(count)]


def loss_on(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def grads_at(model, batch, shifts=None):
    """Gradients of the trainable parameters of a copy of ``model`` moved by ``shifts`` (name -> tensor)."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in trainable(clone).items():
            if shifts and name in shifts:
                p.add_(shifts[name])
    loss_on(clone, batch).backward()
    return {n: p.grad.detach().clone() for n, p in trainable(clone).items()}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
