"""A tiny task for the flatness command-line smoke test: flatness_task(adapter_dir)."""

import torch
import torch.nn.functional as F
from peft import PeftModel


def flatness_task(adapter_dir):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = PeftModel.from_pretrained(base, adapter_dir)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return model, lambda m, batch: F.mse_loss(m(batch[0]), batch[1]), [(x, y)]
