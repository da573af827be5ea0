"""Triton side of the noise contract (see :mod:`flatlora_kernels.noise` for the definition).

``gaussian_tile`` is the one place the kernels turn ``(seed, rows, columns)`` into normals;
the matmul kernels call it on the W tile they are about to multiply, and
``generate_noise_triton`` calls it to write ``Z`` out for tests and tools.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import noise as contract
from .common import INTERPRETER, cdiv

_ROUND_A = tl.constexpr(contract.PHILOX_ROUND_A)
_ROUND_B = tl.constexpr(contract.PHILOX_ROUND_B)
_KEY_A = tl.constexpr(contract.PHILOX_KEY_A)
_KEY_B = tl.constexpr(contract.PHILOX_KEY_B)
_ROUNDS = tl.constexpr(contract.PHILOX_ROUNDS)
_PI = tl.constexpr(3.141592653589793)


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 tensors: four words per counter (step 1 of the contract)."""
    for _ in tl.static_range(_ROUNDS):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(prev_c2, _ROUND_B) ^ c1 ^ k0
        c2 = tl.umulhi(prev_c0, _ROUND_A) ^ c3 ^ k1
        c1 = prev_c2 * _ROUND_B
        c3 = prev_c0 * _ROUND_A
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    """uint32 -> exact float32 in (0, 1) (step 3)."""
    return ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23


@triton.jit
def _box_muller(x_radius, x_angle):
    """Two uint32 words -> two standard normals (step 4)."""
    r = tl.sqrt(-2.0 * tl.log(_uniform(x_radius)))
    theta = (2.0 * _uniform(x_angle) - 1.0) * _PI
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gaussian_tile(seed_lo, seed_hi, rows, col_start, BLOCK_COLS: tl.constexpr):
    """``Z[rows, col_start : col_start + BLOCK_COLS]`` as a float32 ``[len(rows), BLOCK_COLS]`` tile.

    ``col_start`` must be a multiple of 4 and ``BLOCK_COLS`` a multiple of 4, so that each
    Philox call fills four adjacent columns (step 2). Rows and columns past the matrix are
    generated too (finite values); callers mask them.
    """
    tl.static_assert(BLOCK_COLS % 4 == 0, "noise tiles span whole groups of four columns")
    quads = (col_start // 4 + tl.arange(0, BLOCK_COLS // 4)).to(tl.uint32)
    c0 = quads[None, :] + tl.zeros_like(rows).to(tl.uint32)[:, None]
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros_like(quads)[None, :]
    zero = tl.zeros_like(c0)
    k0 = tl.full(c0.shape, 0, tl.uint32) + seed_lo.to(tl.uint32)
    k1 = tl.full(c0.shape, 0, tl.uint32) + seed_hi.to(tl.uint32)
    x0, x1, x2, x3 = philox4x32(c0, c1, zero, zero, k0, k1)
    z0, z1 = _box_muller(x0, x1)
    z2, z3 = _box_muller(x2, x3)
    # interleave(interleave(z0, z2), interleave(z1, z3)) puts z_l at column 4q + l.
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _write_noise_kernel(out_ptr, M, N, stride_om, stride_on, seed_lo, seed_hi,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    z = gaussian_tile(seed_lo, seed_hi, rows, col_start, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, z, mask=mask)


def generate_noise_triton(seed: int, m: int, n: int, device, *, block_m: int | None = None,
                          block_n: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Materialise ``Z(seed)`` of shape ``(m, n)`` with the Triton kernel (tile sizes are free)."""
    seed_lo, seed_hi = contract.split_seed(seed)
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=device)
    block_m = block_m or (16 if INTERPRETER else 32)
    block_n = block_n or (64 if INTERPRETER else 128)
    if m and n:
        grid = (cdiv(m, block_m), cdiv(n, block_n))
        _write_noise_kernel[grid](out, m, n, out.stride(0), out.stride(1), seed_lo, seed_hi,
                                  BLOCK_M=block_m, BLOCK_N=block_n)
    return out
