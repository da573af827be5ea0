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
    """Philox4x32-10 on uint32 tensors: four words per counter (step 1 of the contract).

    Each round's two 32x32 -> 64-bit products are formed as uint64 multiplies, so the GPU gets
    both halves from one wide multiply (``IMAD.WIDE.U32``) instead of separate hi and lo ones.
    """
    for _ in tl.static_range(_ROUNDS):
        product_a = c0.to(tl.uint64) * _ROUND_A
        product_b = c2.to(tl.uint64) * _ROUND_B
        c0 = (product_b >> 32).to(tl.uint32) ^ c1 ^ k0
        c2 = (product_a >> 32).to(tl.uint32) ^ c3 ^ k1
        c1 = product_b.to(tl.uint32)
        c3 = product_a.to(tl.uint32)
        k0 = k0 + _KEY_A
        k1 = k1 + _KEY_B
    return c0, c1, c2, c3


@triton.jit
def _uniform_plus_one(x):
    """uint32 -> ``1 + u`` with ``u = ((x >> 9) + 0.5) * 2**-23`` rounded down to the float32 grid
    of [1, 2): the top 23 bits become the mantissa of a float in [1, 2) (no int-to-float conversion,
    which runs at a quarter of the integer rate on Hopper). Callers finish ``u`` exactly."""
    return ((x >> 9) | 0x3F800000).to(tl.float32, bitcast=True)


@triton.jit
def _uniform(x):
    """uint32 -> exact float32 in (0, 1) (step 3): ``(1 + k * 2**-23) - (1 - 2**-24)`` is exactly
    ``(k + 0.5) * 2**-23``, a float32, so the one rounding is exact."""
    return _uniform_plus_one(x) - 0.99999994039535522461  # 1 - 2**-24


@triton.jit
def _approx(x, INSTRUCTION: tl.constexpr):
    """One PTX approximate float32 instruction (an SFU op on the GPU; no interpreter support)."""
    return tl.inline_asm_elementwise(INSTRUCTION + " $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _box_muller(x_radius, x_angle, FAST_MATH: tl.constexpr):
    """Two uint32 words -> two standard normals (step 4).

    ``2u - 1`` is exact, as the contract requires. With ``FAST_MATH`` the logarithm, sine and
    cosine are the hardware approximations (``lg2/sin/cos.approx.ftz.f32``; theta is already in
    (-pi, pi), so no range reduction is needed); see ``FAST_NOISE_ATOL`` for how far that moves Z.
    """
    theta = (2.0 * _uniform(x_angle) - 1.0) * _PI
    if FAST_MATH:
        # Near u = 1 the approximate log's absolute error exceeds |log2 u| itself and could make
        # r**2 negative (sqrt -> NaN): clamp at 0, which moves Z by at most ~6e-4 there.
        r_squared = _approx(_uniform(x_radius), "lg2.approx.ftz.f32") * -1.3862943611198906  # -2 ln 2
        r = tl.sqrt(tl.maximum(r_squared, 0.0))
        return r * _approx(theta, "cos.approx.ftz.f32"), r * _approx(theta, "sin.approx.ftz.f32")
    r = tl.sqrt(-2.0 * tl.log(_uniform(x_radius)))
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gaussian_tile(seed_lo, seed_hi, rows, col_start, BLOCK_COLS: tl.constexpr, FAST_MATH: tl.constexpr = False,
                  COLS_ALIGNED: tl.constexpr = True):
    """``Z[rows, col_start : col_start + BLOCK_COLS]`` as a float32 ``[len(rows), BLOCK_COLS]`` tile.

    ``FAST_MATH`` (GPU only: inline PTX) uses the hardware ``lg2/sin/cos`` approximations.

    With ``COLS_ALIGNED`` (the fast path) ``col_start`` must be a multiple of 4, so that each Philox
    call fills four adjacent columns (step 2). Without it ``col_start`` may be anything (a
    tensor-parallel shard whose first column is not a multiple of 4): every element then runs its
    own Philox call and picks its lane, four times the work for the same values. ``BLOCK_COLS`` is a
    multiple of 4 either way. Rows and columns past the matrix are generated too (finite values);
    callers mask them.
    """
    tl.static_assert(BLOCK_COLS % 4 == 0, "noise tiles span whole groups of four columns")
    if COLS_ALIGNED:
        # An unsigned shift, not a signed division: col_start >= 0 (columns reach 2**34, quads fit 32 bits).
        quads = (col_start.to(tl.uint64) >> 2).to(tl.uint32) + tl.arange(0, BLOCK_COLS // 4).to(tl.uint32)
        x0, x1, x2, x3 = _philox_grid(seed_lo, seed_hi, rows, quads)
        z0, z1 = _box_muller(x0, x1, FAST_MATH)
        z2, z3 = _box_muller(x2, x3, FAST_MATH)
        # interleave(interleave(z0, z2), interleave(z1, z3)) puts z_l at column 4q + l.
        z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
    else:
        cols = col_start + tl.arange(0, BLOCK_COLS)
        x0, x1, x2, x3 = _philox_grid(seed_lo, seed_hi, rows, (cols // 4).to(tl.uint32))
        lane = (cols % 4)[None, :]
        z_cos, z_sin = _box_muller(tl.where(lane < 2, x0, x2), tl.where(lane < 2, x1, x3), FAST_MATH)
        z = tl.where(lane % 2 == 0, z_cos, z_sin)
    return z


@triton.jit
def _philox_grid(seed_lo, seed_hi, rows, quads):
    """The four Philox words of counter ``(quad, row, 0, 0)`` for every (row, quad) pair: [rows, quads]."""
    c0 = quads[None, :] + tl.zeros_like(rows).to(tl.uint32)[:, None]
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros_like(quads)[None, :]
    zero = tl.zeros_like(c0)
    k0 = tl.full(c0.shape, 0, tl.uint32) + seed_lo.to(tl.uint32)
    k1 = tl.full(c0.shape, 0, tl.uint32) + seed_hi.to(tl.uint32)
    return philox4x32(c0, c1, zero, zero, k0, k1)


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _write_noise_kernel(out_ptr, M, N, stride_om, stride_on, seed_lo, seed_hi, row_offset, col_offset,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FAST_MATH: tl.constexpr,
                        COLS_ALIGNED: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    col_start = tl.program_id(1).to(tl.int64) * BLOCK_N
    cols = col_start + tl.arange(0, BLOCK_N)
    z = gaussian_tile(seed_lo, seed_hi, row_offset + rows, col_offset + col_start, BLOCK_N, FAST_MATH, COLS_ALIGNED)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, z, mask=mask)


def generate_noise_triton(seed: int, m: int, n: int, device, *, offset: tuple[int, int] = (0, 0),
                          block_m: int | None = None, block_n: int | None = None, out: torch.Tensor | None = None,
                          fast_math: bool = False) -> torch.Tensor:
    """Materialise ``Z(seed)[r0 : r0 + m, c0 : c0 + n]`` with ``(r0, c0) = offset`` (tile sizes are free).

    ``fast_math`` (GPU only) writes the Z the 16-bit matmul kernels use: hardware lg2/sin/cos,
    within ``noise.FAST_NOISE_ATOL`` of the precise Z.
    """
    seed_lo, seed_hi = contract.split_seed(seed)
    row_offset, col_offset = offset
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=device)
    block_m = block_m or (16 if INTERPRETER else 32)
    block_n = block_n or (64 if INTERPRETER else 128)
    if m and n:
        grid = (cdiv(m, block_m), cdiv(n, block_n))
        _write_noise_kernel[grid](out, m, n, out.stride(0), out.stride(1), seed_lo, seed_hi, row_offset, col_offset,
                                  BLOCK_M=block_m, BLOCK_N=block_n, FAST_MATH=fast_math,
                                  COLS_ALIGNED=col_offset % 4 == 0)
    return out
