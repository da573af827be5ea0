"""A tiny task for the flatness command-line smoke test: flatness_task(adapter_dir).

A file of its own because the command line under test loads a task from a path, in a subprocess;
the model is the tests' TinyMLP, so that this file adds no model of its own.
"""

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the subprocess may start anywhere
from tests.helpers import TinyMLP  # noqa: E402


def flatness_task(adapter_dir):
    torch.manual_seed(0)
    model = PeftModel.from_pretrained(TinyMLP(6, 5, 3), adapter_dir)
    x, y = torch.randn(16, 6), torch.randn(16, 3)
    return model, lambda m, batch: F.mse_loss(m(batch[0]), batch[1]), [(x, y)]
