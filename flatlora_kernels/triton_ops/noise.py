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
def _uniform(half_bits):
    """A 16-bit half ``h`` (in the low bits, upper bits zero) -> the exact float32 ``u = (h + 0.5) * 2**-16``.

    ``h | 0x3F800000`` is the float ``1 + h * 2**-23`` (one integer op: no int-to-float conversion,
    which runs at a quarter of the integer rate on Hopper), and ``128 v - (128 - 2**-17)`` is exactly
    u: the product is exact, the constant is a float32, and the result is representable, so the one
    rounding of the FMA (or the two of a separate multiply and add) changes nothing.
    """
    return tl.fma((half_bits | 0x3F800000).to(tl.float32, bitcast=True), 128.0, -127.99999237060547)


@triton.jit
def _approx(x, INSTRUCTION: tl.constexpr):
    """One PTX approximate float32 instruction (an SFU op on the GPU; no interpreter support)."""
    return tl.inline_asm_elementwise(INSTRUCTION + " $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def _box_muller(x, FAST_MATH: tl.constexpr):
    """One uint32 word -> its two standard normals (cos term, sin term), steps 3 and 4.

    The radius uses the low half, the angle the high half; ``2u - 1`` and theta are formed exactly as
    the contract writes them (``fma(u, 2, -1)`` is exact; with ``FAST_MATH`` theta is the single FMA
    ``fl(2 pi) u - fl(pi)``, whose one rounding gives the same float as ``fl(pi) * (2u - 1)``). With
    ``FAST_MATH`` the logarithm, sine and cosine are the hardware approximations
    (``lg2/sin/cos.approx.ftz.f32``; theta is already in (-pi, pi), so no range reduction is
    needed); see ``FAST_NOISE_ATOL`` for how far that moves Z.
    """
    u = _uniform(x & 0xFFFF)
    u_angle = _uniform(x >> 16)
    if FAST_MATH:
        theta = tl.fma(u_angle, 2.0 * _PI, -_PI)
        # u <= 1 - 2**-17, so |log2 u| >= 1.1e-5, far above the approximate lg2's absolute error
        # (2**-22.6): r**2 stays positive without a clamp.
        r = tl.sqrt(_approx(u, "lg2.approx.ftz.f32") * -1.3862943611198906)  # -2 ln 2
        return r * _approx(theta, "cos.approx.ftz.f32"), r * _approx(theta, "sin.approx.ftz.f32")
    theta = tl.fma(u_angle, 2.0, -1.0) * _PI
    r = tl.sqrt(-2.0 * tl.log(u))
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gaussian_tile(seed_lo, seed_hi, rows, col_start, BLOCK_COLS: tl.constexpr, FAST_MATH: tl.constexpr = False,
                  COLS_ALIGNED: tl.constexpr = True):
    """``Z[rows, col_start : col_start + BLOCK_COLS]`` as a float32 ``[len(rows), BLOCK_COLS]`` tile.

    ``FAST_MATH`` (GPU only: inline PTX) uses the hardware ``lg2/sin/cos`` approximations.

    With ``COLS_ALIGNED`` (the fast path) ``col_start`` must be a multiple of 8, so that each Philox
    call fills eight adjacent columns (step 2). Without it ``col_start`` may be anything (a
    tensor-parallel shard whose first column is not a multiple of 8): every element then runs its
    own Philox call and picks its output, eight times the work for the same values. ``BLOCK_COLS``
    is a multiple of 8 either way. Rows and columns past the matrix are generated too (finite
    values); callers mask them.
    """
    tl.static_assert(BLOCK_COLS % 8 == 0, "noise tiles span whole groups of eight columns")
    if COLS_ALIGNED:
        # An unsigned shift, not a signed division: col_start >= 0 (columns reach 2**34, calls fit 32 bits).
        calls = (col_start.to(tl.uint64) >> 3).to(tl.uint32) + tl.arange(0, BLOCK_COLS // 8).to(tl.uint32)
        x0, x1, x2, x3 = _philox_grid(seed_lo, seed_hi, rows, calls)
        c0, s0 = _box_muller(x0, FAST_MATH)
        c1, s1 = _box_muller(x1, FAST_MATH)
        c2, s2 = _box_muller(x2, FAST_MATH)
        c3, s3 = _box_muller(x3, FAST_MATH)
        # interleave(interleave(t0, t2), interleave(t1, t3)) puts word p's term at 4q + p; the outer
        # interleave of the cos and sin terms puts them at 8q + 2p and 8q + 2p + 1.
        cos_terms = tl.interleave(tl.interleave(c0, c2), tl.interleave(c1, c3))
        sin_terms = tl.interleave(tl.interleave(s0, s2), tl.interleave(s1, s3))
        z = tl.interleave(cos_terms, sin_terms)
    else:
        cols = col_start + tl.arange(0, BLOCK_COLS)
        x0, x1, x2, x3 = _philox_grid(seed_lo, seed_hi, rows, (cols // 8).to(tl.uint32))
        output = (cols % 8)[None, :]
        word = tl.where(output < 4, tl.where(output < 2, x0, x1), tl.where(output < 6, x2, x3))
        z_cos, z_sin = _box_muller(word, FAST_MATH)
        z = tl.where(output % 2 == 0, z_cos, z_sin)
    return z


@triton.jit
def _philox_grid(seed_lo, seed_hi, rows, calls):
    """The four Philox words of counter ``(call, row, 0, 0)`` for every (row, call) pair: [rows, calls]."""
    c0 = calls[None, :] + tl.zeros_like(rows).to(tl.uint32)[:, None]
    c1 = rows.to(tl.uint32)[:, None] + tl.zeros_like(calls)[None, :]
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
    """Materialise ``Z(seed)[r0 : r0 + m, c0 : c0 + n]`` with ``(r0, c0) = offset`` (tile sizes are free,
    ``block_n`` a multiple of 8).

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
                                  COLS_ALIGNED=col_offset % contract.NORMALS_PER_CALL == 0)
    return out
