"""Float64 oracles and tolerance helpers shared by the tests."""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flatlora_kernels as fk

# Relative error allowed against a float64 oracle, as a fraction of the reference's max |value|.
# bf16 keeps 8 mantissa bits (eps 2**-8 = 3.9e-3), fp16 11 (4.9e-4): a few eps of the inputs'
# own rounding, summed over short dot products, stays well under these; a wrong noise row does not.
REL_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return ((actual.double() - expected).abs().max() / scale).item()


def assert_close_rel(actual, expected, dtype, what=""):
    err = rel_err(actual, expected)
    assert err <= REL_TOL[dtype], f"{what}: relative error {err:.3g} > {REL_TOL[dtype]:.3g} ({dtype})"


def float64_flat_lora(x, weight, bias, lora_A, lora_B, scaling, seed, row_std, keep=None, dropout_p=0.0,
                      noise_offset=(0, 0)):
    """Autograd through an explicitly materialised ``W + diag(c) Z`` in float64.

    With ``noise_offset = (r0, c0)`` the noise is cut from the whole matrix up to the block's far
    corner (the offset-free path), so the oracle does not share the offset logic it checks.

    Returns ``(y, leaves)`` where leaves are float64 copies of ``x, lora_A, lora_B, bias`` that
    require grad, so callers can backprop any ``dy`` and read the oracle gradients.
    """
    m, n = weight.shape
    x64 = x.detach().double().requires_grad_()
    a64 = lora_A.detach().double().requires_grad_()
    b64 = lora_B.detach().double().requires_grad_()
    bias64 = None if bias is None else bias.detach().double().requires_grad_()
    w = weight.detach().double()
    if row_std is not None:
        r0, c0 = noise_offset
        z = fk.generate_noise(seed, r0 + m, c0 + n, device=weight.device)[r0:, c0:].double()
        w = w + row_std.double()[:, None] * z
    x_lora = x64 if keep is None else x64 * keep.double() / (1.0 - dropout_p)
    y = x64 @ w.t() + scaling * (x_lora @ a64.t()) @ b64.t()
    if bias64 is not None:
        y = y + bias64
    return y, (x64, a64, b64, bias64)


def run_processes(worker, args: tuple, world: int, deadline_s: float) -> None:
    """Run ``worker(rank, *args)`` in ``world`` spawned processes; a hang or crash fails the test.

    Workers join with ``join_process_group`` (loopback only, bounded collective timeouts).
    """
    ctx = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=deadline_s)
    while not ctx.join(timeout=2):
        if datetime.datetime.now() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"the {world}-process run did not finish within {deadline_s} s")


def join_process_group(rank: int, world: int, init_file: str, backend: str = "gloo") -> None:
    """Join a process group over loopback only, with collectives that time out instead of hanging."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # gloo talks over loopback only, never the host's other interfaces
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
