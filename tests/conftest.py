"""Pytest fixtures and set-up only (everything else the tests share is in helpers.py): the Triton
interpreter on machines without CUDA, and the (device, backend) pairs.

TRITON_INTERPRET must be set before triton is imported anywhere, hence here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from flatlora_kernels.backends import BACKEND_ENV, BACKENDS, _unavailable_reason  # noqa: E402

from .helpers import DEVICES  # noqa: E402


def backend_cases():
    """Every (device, backend) pair that can run here."""
    cases = []
    for device in DEVICES:
        for backend in BACKENDS:
            if _unavailable_reason(backend, torch.device(device)) is not None:
                continue
            cases.append(pytest.param((device, backend), id=f"{device}-{backend}"))
    return cases


@pytest.fixture(params=backend_cases())
def device_backend(request, monkeypatch):
    """(device, backend name) with FLATLORA_BACKEND forced to that backend for the test."""
    device, backend = request.param
    monkeypatch.setenv(BACKEND_ENV, backend)
    return torch.device(device), backend


@pytest.fixture(autouse=True)
def _fresh_seed():
    torch.manual_seed(0)
