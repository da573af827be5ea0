"""The noise contract: one definition of the standard-normal matrix ``Z(seed, i, j)``.

Every implementation in this package (the Triton kernels, the pure-torch reference below,
and the native code in ``csrc/``) computes exactly this function. It depends only on the
64-bit ``seed`` and the element's logical position ``(i, j)`` in the ``(out_features,
in_features)`` weight, never on tile sizes, token counts, batch order, device or kernel.

Definition
----------
1. **Generator.** Philox4x32-10 (Salmon et al., SC'11; the Random123 reference constants):
   key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``; ten rounds of::

       hi0:lo0 = 0xD2511F53 * c0          (64-bit product of two uint32)
       hi1:lo1 = 0xCD9E8D57 * c2
       (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
       k0 += 0x9E3779B9;  k1 += 0xBB67AE85   (mod 2**32)

2. **Counter layout.** Element ``(i, j)`` belongs to the Philox call with counter
   ``(c0, c1, c2, c3) = (j >> 2, i, 0, 0)`` and takes lane ``j & 3`` of its four outputs
   ``(x0, x1, x2, x3)``. One call therefore serves four neighbouring columns of one row;
   ``i < 2**32`` and ``j < 2**34``, so matrices with ``m * n >= 2**31`` are covered.

3. **Uniforms.** Each uint32 word ``x`` becomes ``u = ((x >> 9) + 0.5) * 2**-23``, an exact
   float32 in ``(0, 1)`` (the smallest is ``2**-24``, the largest ``1 - 2**-24``).

4. **Normals (Box-Muller, all four words used).** From ``(x0, x1)``::

       r = sqrt(-2 * ln(u(x0)));   theta = float32(pi) * (2 * u(x1) - 1)   # in (-pi, pi)
       lane 0 = r * cos(theta);    lane 1 = r * sin(theta)

   and likewise lanes 2 and 3 from ``(x2, x3)``. All arithmetic is float32; ``2*u - 1`` is
   exact, the product with pi is one rounded float32 multiply. Only ``ln``, ``sqrt``,
   ``cos`` and ``sin`` may differ between devices, in their last bits.

5. **Tails.** Because ``u >= 2**-24``, ``|Z| <= sqrt(48 ln 2) ~= 5.768``: the tail beyond that
   (probability ~8e-9 per draw) is cut off, nothing else is clipped.

**Hardware approximations.** The fused bf16/fp16 kernels on a GPU evaluate ``ln``, ``sin`` and
``cos`` with the SFU instructions ``lg2/sin/cos.approx.ftz.f32`` (no range reduction: theta is in
(-pi, pi) by construction). Everything else (Philox words, uniforms, ``2u - 1``, ``theta``) stays
bit-exact, so Z moves by at most ``FAST_NOISE_ATOL``: a few 1e-6 typically (sin/cos), most where
the radius is smallest. Near u = 1 the approximate ``lg2`` has an absolute error (of order 2**-22)
as large as ``|log2 u|`` itself, so ``r**2`` is clamped at 0 (never NaN) and r can move by up to
~6e-4 there. Even that is 1/13 of a bf16 step at 1.0, before Z is scaled by ``c`` (typically
0.05 times the row's rms weight). float32 kernels, ``generate_noise`` and the
interpreter keep the precise functions.

The perturbation of a layer is ``eps = diag(c) Z`` with ``c`` the ``(m,)`` float32 vector of
row standard deviations; ``Z`` is only ever regenerated, never stored by the fused paths.
"""

from __future__ import annotations

import math

import torch

# Version of the definition above; saved in every controller state so a resume under another definition
# (other noise for the same seed) is caught.
CONTRACT_VERSION = 1
PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
NORMALS_PER_CALL = 4
SEED_LIMIT = 2**64
# Largest |Z| the contract can produce: the Box-Muller radius at u = 2**-24.
MAX_ABS_NORMAL = math.sqrt(-2.0 * math.log(2.0**-24))
# How far the hardware-approximation path (fused 16-bit kernels on a GPU) may move Z; see above.
FAST_NOISE_ATOL = 1e-3

_MASK32 = 0xFFFFFFFF


_MASK64 = 2**64 - 1


# ------------------------------------------------------------------------------------- seeds
# A seed is a Python int in [0, 2**64) everywhere in the public API. Operator schemas and the
# C++ side carry int64, so crossing them maps it two's-complement style (seed_to_int64) and back.
def check_seed(seed: int) -> int:
    """Return ``seed`` if it is a Python int in ``[0, 2**64)``; raise otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be a Python int in [0, 2**64), got {type(seed).__name__} {seed!r}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return seed


def split_seed(seed: int) -> tuple[int, int]:
    """Check a seed and return its Philox key ``(low 32 bits, high 32 bits)``."""
    check_seed(seed)
    return seed & _MASK32, seed >> 32


def seed_to_int64(seed: int) -> int:
    """The signed int64 with the same 64 bits as ``seed`` (for operator schemas and C++)."""
    check_seed(seed)
    return seed - SEED_LIMIT if seed >= 2**63 else seed


def seed_from_int64(value: int) -> int:
    """Inverse of :func:`seed_to_int64`."""
    return value & _MASK64


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def layer_seed(seed: int, sample: int, layer: int, rank_tag: int) -> int:
    """The seed of layer ``layer`` in noise sample ``sample``: SplitMix64 finalisers chained over
    ``(seed, sample, layer, rank_tag)``, i.e. ``mix(mix(mix(mix(seed) ^ sample) ^ layer) ^ rank_tag)``.

    Neighbouring inputs give unrelated 64-bit seeds, so layers, samples and ranks draw independent
    noise from one base seed. ``rank_tag`` is ``rank + 1`` for per-rank noise and 0 for shared noise.
    """
    z = _splitmix64(check_seed(seed))
    for part in (sample, layer, rank_tag):
        z = _splitmix64(z ^ part)
    return z


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low words of ``a * b`` for a uint32 constant ``a`` and uint32 values in int64.

    The product can reach 2**64, beyond int64, so ``a`` is split into 16-bit halves and each
    partial product (< 2**48) stays exact.
    """
    a_lo, a_hi = a & 0xFFFF, a >> 16
    p_lo = b * a_lo
    p_hi = b * a_hi
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(
    seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor | None = None, c3: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 on int64 tensors holding uint32 values (the reference generator)."""
    k0, k1 = split_seed(seed)
    c0 = c0.to(torch.int64)
    c1 = c1.to(torch.int64).expand_as(c0)
    c2 = torch.zeros_like(c0) if c2 is None else c2.to(torch.int64).expand_as(c0)
    c3 = torch.zeros_like(c0) if c3 is None else c3.to(torch.int64).expand_as(c0)
    for _ in range(PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo32(PHILOX_ROUND_A, c0)
        hi1, lo1 = _mulhilo32(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def uniform_from_bits(x: torch.Tensor) -> torch.Tensor:
    """Step 3 of the contract: uint32 words (in int64) to exact float32 uniforms in (0, 1)."""
    return ((x >> 9).to(torch.float32) + 0.5) * 2.0**-23


def box_muller(x_radius: torch.Tensor, x_angle: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of the contract: two uint32 words to two standard normals (float32)."""
    r = torch.sqrt(-2.0 * torch.log(uniform_from_bits(x_radius)))
    theta = (2.0 * uniform_from_bits(x_angle) - 1.0) * torch.tensor(math.pi, dtype=torch.float32)
    return r * torch.cos(theta), r * torch.sin(theta)


def reference_noise_block(seed: int, row_start: int, row_end: int, col_start: int, col_end: int,
                          device=None) -> torch.Tensor:
    """``Z(seed)[row_start:row_end, col_start:col_end]``, float32, in plain torch."""
    if not 0 <= row_start <= row_end <= 2**32 or not 0 <= col_start <= col_end <= 2**34:
        raise ValueError(f"block rows [{row_start}, {row_end}) x cols [{col_start}, {col_end}) "
                         "lies outside the 2**32 x 2**34 index space of the contract")
    first_quad = col_start // NORMALS_PER_CALL
    quads = -(-col_end // NORMALS_PER_CALL) - first_quad
    rows = torch.arange(row_start, row_end, dtype=torch.int64, device=device)[:, None]
    cols = torch.arange(first_quad, first_quad + quads, dtype=torch.int64, device=device)[None, :]
    x0, x1, x2, x3 = philox4x32(seed, cols.expand(rows.shape[0], quads), rows)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(rows.shape[0], quads * NORMALS_PER_CALL)
    skip = col_start - first_quad * NORMALS_PER_CALL
    return z[:, skip:skip + col_end - col_start]


def reference_noise(seed: int, m: int, n: int, device=None, rows_per_chunk: int = 1024, *,
                    offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``Z(seed)[r0 : r0 + m, c0 : c0 + n]`` with ``(r0, c0) = offset`` (the whole matrix by default) in
    plain torch, built a bounded block of rows at a time."""
    row_offset, col_offset = offset
    out = torch.empty(m, n, dtype=torch.float32, device=device)
    for start in range(0, m, rows_per_chunk):
        stop = min(m, start + rows_per_chunk)
        out[start:stop] = reference_noise_block(seed, row_offset + start, row_offset + stop, col_offset,
                                                col_offset + n, device=device)
    return out
