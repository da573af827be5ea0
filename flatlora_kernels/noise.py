"""The noise contract: one definition of the standard-normal matrix ``Z(seed, i, j)``.

Every implementation in this package (the Triton kernels, the pure-torch reference below,
and the native code in ``csrc/``) computes exactly this function. It depends only on the
64-bit ``seed`` and the element's logical position ``(i, j)`` in the ``(out_features,
in_features)`` weight, never on tile sizes, token counts, batch order, device or kernel.

Definition (contract version 2)
------------------------------
1. **Generator.** Philox4x32-10 (Salmon et al., SC'11; the Random123 reference constants):
   key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``; ten rounds of::

       hi0:lo0 = 0xD2511F53 * c0          (64-bit product of two uint32)
       hi1:lo1 = 0xCD9E8D57 * c2
       (c0, c1, c2, c3) = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
       k0 += 0x9E3779B9;  k1 += 0xBB67AE85   (mod 2**32)

   The output words ``(x0, x1, x2, x3)`` are the final ``(c0, c1, c2, c3)``; Random123's
   known-answer vectors for philox4x32-10 hold for them.

2. **Counter layout.** Element ``(i, j)`` belongs to the Philox call with counter
   ``(c0, c1, c2, c3) = (j >> 3, i, 0, 0)`` and is its output ``j & 7``. One call serves eight
   neighbouring columns ``8q .. 8q + 7`` of one row; ``i < 2**32`` and ``j < 2**34``.

3. **Sixteen 16-bit uniforms.** Word ``x_p`` (p = 0..3) splits into its low half
   ``a_p = x_p & 0xFFFF`` (the radius) and its high half ``b_p = x_p >> 16`` (the angle). A half
   ``h`` becomes the midpoint uniform ``u(h) = (h + 0.5) * 2**-16``, an exact float32 in (0, 1)
   (smallest ``2**-17``, largest ``1 - 2**-17``); ``2 u(h) - 1 = (h + 0.5) * 2**-15 - 1`` is exact too.

4. **Four Box-Muller pairs.** Pair ``p`` gives outputs ``2p`` and ``2p + 1``, i.e. columns
   ``8q + 2p`` and ``8q + 2p + 1``::

       r = sqrt(-2 * ln(u(a_p)));   theta = float32(pi) * (2 * u(b_p) - 1)   # in (-pi, pi)
       Z[i, 8q + 2p] = r * cos(theta);   Z[i, 8q + 2p + 1] = r * sin(theta)

   The reference below evaluates this in float32 (the product with pi is one rounded multiply).
   Implementations may evaluate ``ln``, ``sqrt``, ``cos`` and ``sin`` (of ``pi * t``) their own
   way within the tolerances below; the words, halves and uniforms are exact everywhere.

5. **What the discretisation does.** The radius takes only 65,536 values (``RADIUS_VALUES``)
   and is bounded: ``|Z| <= sqrt(-2 ln 2**-17) = sqrt(34 ln 2) ~= 4.8546`` (``MAX_ABS_NORMAL``).
   A standard normal exceeds that with probability ~1.21e-6 (about 54 entries of a 4096 x 11008
   draw); those are the only values clipped. The angle takes 65,536 equally spaced values, so
   ``E[cos^2] = E[sin^2] = 1/2`` exactly and the variance of the discretised draw is exactly
   ``E[r^2] / 2 = -mean_h ln u(h) = ln 65536 - (lgamma(65536.5) - lgamma(0.5)) / 65536
   = 1 - 5.288e-6`` (``NOISE_VARIANCE``; the mean is 0, odd moments vanish, the fourth moment is
   2.99979 instead of 3). Each call yields twice the normals of contract version 1 (four
   normals from 23-bit uniforms, radius bound 5.77), which halves the Philox work per normal.

**Tolerances.** Against the float64 evaluation of step 4 (exact uniforms, ``theta = pi * t``
in float64), the float32 reference, the native CPU generator (its own vectorised polynomials,
identical bits on its AVX-512, AVX2 and portable paths) and the precise Triton/CUDA paths stay
within ``PRECISE_NOISE_ATOL``. The fused bf16/fp16 kernels on a GPU evaluate ``ln``, ``sin`` and
``cos`` with the SFU instructions ``lg2/sin/cos.approx.ftz.f32`` (theta is already in (-pi, pi)),
so Z moves by at most ``FAST_NOISE_ATOL``: a few 1e-6 typically (sin/cos), most where the
radius is smallest. Since ``u <= 1 - 2**-17``, ``|log2 u| >= 1.1e-5`` stays far above the
approximate ``lg2``'s absolute error (``2**-22.6``), so ``r**2`` needs no clamp and r moves by at
most ~1% near u = 1 (where r ~ 4e-3, i.e. ~4e-5 absolute). All of this is far below a bf16 step
at 1.0, before Z is scaled by ``c`` (typically 0.05 times the row's rms weight).

The perturbation of a layer is ``eps = diag(c) Z`` with ``c`` the ``(m,)`` float32 vector of
row standard deviations; ``Z`` is only ever regenerated, never stored by the fused paths.
"""

from __future__ import annotations

import math

import torch

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
# Version of the definition above, recorded in benchmark records and saved in every controller state so
# that a resume under another definition (other noise for the same seed) is caught.
CONTRACT_VERSION = 2
NORMALS_PER_CALL = 8
UNIFORM_BITS = 16
RADIUS_VALUES = 2**UNIFORM_BITS
# Column and row limits of the index space (Philox counter words are 32 bits).
ROW_LIMIT = 2**32
COLUMN_LIMIT = 2**34
SEED_LIMIT = 2**64
# Largest |Z| the contract can produce: the Box-Muller radius at the smallest uniform, 2**-17.
MAX_ABS_NORMAL = math.sqrt(-2.0 * math.log(2.0 ** -(UNIFORM_BITS + 1)))
# Exact variance of the discretised draw: -mean of ln u(h) over the 65,536 midpoint uniforms.
NOISE_VARIANCE = math.log(RADIUS_VALUES) - (math.lgamma(RADIUS_VALUES + 0.5) - math.lgamma(0.5)) / RADIUS_VALUES
# How far precise implementations may be from the float64 evaluation of the contract; see above.
PRECISE_NOISE_ATOL = 4e-6
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


def uniform_from_half(h: torch.Tensor) -> torch.Tensor:
    """Step 3 of the contract: 16-bit halves (in int64) to exact float32 midpoint uniforms in (0, 1)."""
    return (h.to(torch.float32) + 0.5) * 2.0**-UNIFORM_BITS


def box_muller(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 of the contract: one uint32 word (in int64) to its two standard normals (float32):
    the radius from the low half, the angle from the high half."""
    r = torch.sqrt(-2.0 * torch.log(uniform_from_half(x & 0xFFFF)))
    theta = (2.0 * uniform_from_half(x >> UNIFORM_BITS) - 1.0) * torch.tensor(math.pi, dtype=torch.float32)
    return r * torch.cos(theta), r * torch.sin(theta)


def box_muller_float64(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 in float64 with theta = pi * (2u - 1) unrounded: what ``PRECISE_NOISE_ATOL`` is measured against."""
    u_radius = ((x & 0xFFFF).double() + 0.5) * 2.0**-UNIFORM_BITS
    turns = ((x >> UNIFORM_BITS).double() + 0.5) * 2.0 ** -(UNIFORM_BITS - 1) - 1.0
    r = torch.sqrt(-2.0 * torch.log(u_radius))
    return r * torch.cos(math.pi * turns), r * torch.sin(math.pi * turns)


def reference_noise_block(seed: int, row_start: int, row_end: int, col_start: int, col_end: int,
                          device=None, *, float64: bool = False) -> torch.Tensor:
    """``Z(seed)[row_start:row_end, col_start:col_end]`` in plain torch: float32 as step 4 writes it,
    or with ``float64`` the float64 evaluation the tolerances refer to."""
    if not 0 <= row_start <= row_end <= ROW_LIMIT or not 0 <= col_start <= col_end <= COLUMN_LIMIT:
        raise ValueError(f"block rows [{row_start}, {row_end}) x cols [{col_start}, {col_end}) "
                         "lies outside the 2**32 x 2**34 index space of the contract")
    first_call = col_start // NORMALS_PER_CALL
    calls = -(-col_end // NORMALS_PER_CALL) - first_call
    rows = torch.arange(row_start, row_end, dtype=torch.int64, device=device)[:, None]
    cols = torch.arange(first_call, first_call + calls, dtype=torch.int64, device=device)[None, :]
    transform = box_muller_float64 if float64 else box_muller
    words = philox4x32(seed, cols.expand(rows.shape[0], calls), rows)
    # Output 2p + s of a call is pair p's cosine (s = 0) or sine (s = 1) term.
    z = torch.stack([part for word in words for part in transform(word)], dim=-1)
    z = z.reshape(rows.shape[0], calls * NORMALS_PER_CALL)
    skip = col_start - first_call * NORMALS_PER_CALL
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
