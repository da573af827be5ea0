"""A plain Flat-LoRA training loop that saves everything atomically after every optimizer step and resumes
from what it saved. tests/test_reliability.py runs it in forked processes (:func:`run`), kills them with
SIGKILL at random moments and checks that the resumed run ends bit for bit where a straight run ends."""

from __future__ import annotations

import os
import time

import torch

import flatlora_kernels as fk
from flatlora_kernels.checkpoint import save_atomically

from .helpers import batches, loss_on, tiny_peft, trainable

STEPS = 40
WINDOW = 2
PAUSE_S = 0.03  # per optimizer step, so a kill lands at a random point of a run that lasts ~1 s


def data(step: int, micro: int):
    return batches(1, dtype=torch.float32, seed=1000 * step + micro)[0]


def train(checkpoint: str, pause_s: float = 0.0) -> dict[str, torch.Tensor]:
    """Train to STEPS from ``checkpoint`` if it exists (else from scratch); returns the adapters."""
    model = tiny_peft(torch.float32)
    ctl = fk.apply_flat_lora(model, sigma=0.2, total_steps=STEPS, resample_every=3, seed=5)
    params = trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    ctl.guard(opt)
    start = 0
    if os.path.exists(checkpoint):
        saved = torch.load(checkpoint, weights_only=False)
        ctl.load_state_dict(saved["controller"])  # before the weights: the sample is the saved one anyway
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved["adapters"][name])
        opt.load_state_dict(saved["optimizer"])
        start = saved["step"]
    for step in range(start, STEPS):
        for micro in range(WINDOW):
            (loss_on(model, data(step, micro)) / WINDOW).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
        save_atomically({"step": step + 1, "controller": ctl.state_dict(), "optimizer": opt.state_dict(),
                         "adapters": {n: p.detach().clone() for n, p in params.items()}}, checkpoint)
        time.sleep(pause_s)
    return {n: p.detach().clone() for n, p in params.items()}


def run(checkpoint: str, result: str) -> None:
    """A worker process: train (resuming if ``checkpoint`` exists) with a pause per step; save the adapters."""
    torch.set_num_threads(1)
    save_atomically(train(checkpoint, PAUSE_S), result)
