"""The perturbed matmul: ``a @ op(W + diag(c) Z)`` with the LoRA term fused into the epilogue.

One kernel serves both directions of the Flat-LoRA linear layer:

* forward (``W_ROWS_ARE_N``):  ``y  = x  @ (W + diag(c) Z)^T + bias + s * (u @ B^T)``,
  with ``u = dropout(x) @ A^T``;
* backward dX:                 ``dx = dy @ (W + diag(c) Z) + s * (g @ A) * keep / (1 - p)``,
  with ``g = dy @ B``.

The launcher takes a :class:`~flatlora_kernels.matmul_call.PerturbedMatmul`, whose table gives each
operand's role in each direction; the kernel's arguments carry the same names.

In both, each W tile is loaded once per token tile, its noise tile is regenerated in
registers from the seed (:func:`gaussian_tile`), added in float32 and rounded to the compute
dtype, then fed to ``tl.dot``. W is never written and no noise reaches memory.

W may be a 4-bit (NF4/FP4) base (``WEIGHT_4BIT``): its tile is then dequantized in registers from
the packed codes and block scales (:func:`~flatlora_kernels.triton_ops.quant4bit.load_weight_tile`),
rounded to the weight's dtype as bitsandbytes does, and the noise is added to that, so
``dequant(W4) + diag(c) Z`` exists only tile by tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import noise as contract
from ..matmul_call import PerturbedMatmul
from ..quant4bit import PackedWeight4bit
from .common import (INTERPRETER, cast_needs_manual_rounding, cdiv, dot_needs_fp32_operands,
                     fp32_dot_precision, round_to)
from .launch_settings import MATMUL_CONFIGS, launch_options
from .noise import gaussian_tile
from .quant4bit import load_weight_tile, tile_constexprs, weight_operands
from .row_norms import rank_block


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _perturbed_matmul_kernel(
    # Pointers to matrices (forward / dX; W is the logical (m, n) weight, (N, K) forward, (K, N) for dX)
    a_ptr,  # (M, K): x / dY
    w_ptr,  # W; its packed 4-bit codes with WEIGHT_4BIT
    absmax_ptr, codebook_ptr,  # a 4-bit W's block scales and code levels (stand-ins for a dense W)
    row_std_ptr,  # c, (m,) float32
    bias_ptr,  # (N,): the layer's bias / unused
    lora_hidden_ptr,  # (M, R): u = dropout(x) A^T / g = dY B
    lora_out_factor_ptr,  # (R, N): B^T / A
    dropout_keep_ptr,  # (M, N) bool: unused / the dropout mask of x
    out_ptr,  # (M, N): y / dX
    # Matrix dimensions
    M, N, K, R,
    # Strides
    stride_am, stride_ak, stride_wi, stride_wj,
    stride_hidden_m, stride_hidden_r, stride_factor_r, stride_factor_n,
    stride_keep_m, stride_keep_n, stride_om, stride_on,
    # LoRA term: s, and 1 / (1 - p) for the kept elements
    scaling, keep_scale,
    # Noise: the seed's two words and where W starts in the logical weight (a tensor-parallel shard)
    seed_lo, seed_hi, noise_row_offset, noise_col_offset,
    # Meta-parameters: the direction and which terms exist
    W_ROWS_ARE_N: tl.constexpr,  # True: output columns are W rows (forward); False: W columns (dX)
    HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr,
    # Meta-parameters: arithmetic (interpreter workarounds, fp32 dot precision, hardware noise functions)
    UPCAST_DOT: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr, FP32_PRECISION: tl.constexpr,
    FAST_NOISE: tl.constexpr, NOISE_COLS_ALIGNED: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of BLOCK_K: no K-step is partial
    # Meta-parameters: how W is read (quant4bit.tile_constexprs)
    WEIGHT_4BIT: tl.constexpr, QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr,
    DEQUANT_DTYPE: tl.constexpr, DEQUANT_MANUAL_ROUNDING: tl.constexpr,
    # Meta-parameters: tiles
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    compute_dtype = out_ptr.dtype.element_ty
    # Grouped ordering: neighbouring programs share W tiles in L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_size = GROUP_M * num_n
    first_m = (pid // group_size) * GROUP_M
    rows_in_group = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % rows_in_group
    pid_n = (pid % group_size) // rows_in_group

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_start = pid_n.to(tl.int64) * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    if HAS_NOISE and W_ROWS_ARE_N:  # c of the W rows that are this program's output columns
        std_n = tl.load(row_std_ptr + offs_n, mask=n_ok, other=0.0)
    else:
        std_n = 0.0  # dX: the W rows are the K-step's, their c is loaded per step

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # with EVEN_K the a tiles load unmasked: rows past M re-read row M - 1, for outputs never stored
    a_rows = tl.minimum(offs_m, M - 1) if EVEN_K else offs_m
    acc = _k_loop(acc, a_ptr, w_ptr, absmax_ptr, codebook_ptr, row_std_ptr, std_n, a_rows, m_ok, n_start, offs_n, N, K,
                  stride_am, stride_ak, stride_wi, stride_wj, seed_lo, seed_hi, noise_row_offset, noise_col_offset,
                  compute_dtype, W_ROWS_ARE_N, HAS_NOISE, UPCAST_DOT, MANUAL_BF16_ROUNDING, FP32_PRECISION,
                  FAST_NOISE, NOISE_COLS_ALIGNED, EVEN_K, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS,
                  DEQUANT_DTYPE, DEQUANT_MANUAL_ROUNDING, BLOCK_M, BLOCK_N, BLOCK_K)

    # Epilogue, in float32: + s * (h @ F) [* keep / (1 - p)] + bias, rounded once.
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        hidden = tl.load(lora_hidden_ptr + offs_m[:, None] * stride_hidden_m + ranks[None, :] * stride_hidden_r,
                         mask=m_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        factor = tl.load(lora_out_factor_ptr + ranks[:, None] * stride_factor_r + offs_n[None, :] * stride_factor_n,
                         mask=rank_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        lora = tl.dot(hidden, factor, input_precision="ieee") * scaling
        if HAS_KEEP:
            keep = tl.load(dropout_keep_ptr + offs_m[:, None] * stride_keep_m + offs_n[None, :] * stride_keep_n,
                           mask=m_ok[:, None] & n_ok[None, :], other=0)
            lora = lora * (keep.to(tl.float32) * keep_scale)
        acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             round_to(acc, compute_dtype, MANUAL_BF16_ROUNDING), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _k_loop(acc, a_ptr, w_ptr, absmax_ptr, codebook_ptr, row_std_ptr, std_n, offs_m, m_ok, n_start, offs_n, N, K,
            stride_am, stride_ak, stride_wi, stride_wj, seed_lo, seed_hi, noise_row_offset, noise_col_offset,
            compute_dtype: tl.constexpr, W_ROWS_ARE_N: tl.constexpr, HAS_NOISE: tl.constexpr,
            UPCAST_DOT: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr, FP32_PRECISION: tl.constexpr,
            FAST_NOISE: tl.constexpr, NOISE_COLS_ALIGNED: tl.constexpr, EVEN_K: tl.constexpr,
            WEIGHT_4BIT: tl.constexpr, QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr,
            DEQUANT_DTYPE: tl.constexpr, DEQUANT_MANUAL_ROUNDING: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc += a[offs_m, :] @ op(W + diag(c) Z)[:, offs_n]``, one K-step at a time (``std_n``: c of the
    W rows that are the output columns, forward).

    Software pipelining by hand: step k + 1's noise is generated after step k's ``tl.dot``, to run
    beside the asynchronous wgmma. For that, nothing after the dot may touch memory: ptxas then issues
    the noise between the wgmma and its wait, but it puts the wait first when the pipeliner's async
    copies of the next stage follow the dot (benchmarks/NOTES.md section 1.10). So a dense W's ``a`` and
    W tiles of step k + 1 are loaded into registers before step k's dot (their latency hides behind it)
    and perturbed after it. A 4-bit W keeps the pipeliner's copies and perturbs each step's tile before
    its dot: its in-register dequantization on top of the prefetched tiles spills on sm_90. The loop
    ends with one unused prefetch: past K, its loads masked off, or with ``EVEN_K`` (no K masks at all)
    the last step's tiles again."""
    if HAS_NOISE:
        if NOISE_COLS_ALIGNED:
            noise_col_offset = tl.multiple_of(noise_col_offset, 8)
        # Z is indexed from where W starts in the logical weight; rows are formed in uint32 (the
        # contract's counter word; i < 2**32).
        w_rows = offs_n if W_ROWS_ARE_N else tl.arange(0, BLOCK_K)
        noise_rows = tl.cast(noise_row_offset, tl.uint32) + w_rows.to(tl.uint32)
        z = _noise_tile(seed_lo, seed_hi, noise_rows, noise_col_offset, n_start, 0, 0, W_ROWS_ARE_N, FAST_NOISE,
                        NOISE_COLS_ALIGNED, BLOCK_N, BLOCK_K)
    else:
        noise_rows = 0  # unused without noise
        z = 0.0
    prefetch: tl.constexpr = not WEIGHT_4BIT  # step k + 1's tiles in registers before step k's dot (see above)
    if prefetch:
        a = _a_tile(a_ptr, offs_m, m_ok, 0, K, stride_am, stride_ak, compute_dtype, MANUAL_BF16_ROUNDING, EVEN_K,
                    BLOCK_K)
        w, std = _weight_tile(w_ptr, absmax_ptr, codebook_ptr, row_std_ptr, std_n, n_start, 0, N, K, stride_wi,
                              stride_wj, W_ROWS_ARE_N, HAS_NOISE, EVEN_K, WEIGHT_4BIT, QUANT_BLOCKSIZE,
                              WHOLE_BLOCK_ROWS, DEQUANT_DTYPE, DEQUANT_MANUAL_ROUNDING, BLOCK_N, BLOCK_K)
        w = _perturbed(w, std, z, compute_dtype, W_ROWS_ARE_N, HAS_NOISE, MANUAL_BF16_ROUNDING)
    for k_start in range(0, K, BLOCK_K):
        # the tiles of step k + 1 (prefetch), else of step k, perturbed with its noise now
        if prefetch and EVEN_K:
            k_load = tl.minimum(k_start + BLOCK_K, K - BLOCK_K)  # unmasked loads stay inside W
        elif prefetch:
            k_load = k_start + BLOCK_K
        else:
            k_load = k_start
        a_load = _a_tile(a_ptr, offs_m, m_ok, k_load, K, stride_am, stride_ak, compute_dtype, MANUAL_BF16_ROUNDING,
                         EVEN_K, BLOCK_K)
        w_load, std = _weight_tile(w_ptr, absmax_ptr, codebook_ptr, row_std_ptr, std_n, n_start, k_load, N, K,
                                   stride_wi, stride_wj, W_ROWS_ARE_N, HAS_NOISE, EVEN_K, WEIGHT_4BIT, QUANT_BLOCKSIZE,
                                   WHOLE_BLOCK_ROWS, DEQUANT_DTYPE, DEQUANT_MANUAL_ROUNDING, BLOCK_N, BLOCK_K)
        if not prefetch:
            a = a_load
            w = _perturbed(w_load, std, z, compute_dtype, W_ROWS_ARE_N, HAS_NOISE, MANUAL_BF16_ROUNDING)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc, input_precision=FP32_PRECISION)
        if HAS_NOISE:  # the next step's noise, while this step's MMA runs
            z = _noise_tile(seed_lo, seed_hi, noise_rows, noise_col_offset, n_start, k_start, BLOCK_K,
                            W_ROWS_ARE_N, FAST_NOISE, NOISE_COLS_ALIGNED, BLOCK_N, BLOCK_K)
        if prefetch:
            a = a_load
            w = _perturbed(w_load, std, z, compute_dtype, W_ROWS_ARE_N, HAS_NOISE, MANUAL_BF16_ROUNDING)
    return acc


@triton.jit
def _noise_tile(seed_lo, seed_hi, noise_rows, noise_col_offset, n_start, k_start, K_AHEAD: tl.constexpr,
                W_ROWS_ARE_N: tl.constexpr, FAST_NOISE: tl.constexpr, NOISE_COLS_ALIGNED: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Z on the W tile of the K-step at ``k_start + K_AHEAD``, in W's orientation: ``[BLOCK_N W rows,
    BLOCK_K columns]`` forward, ``[BLOCK_K W rows, BLOCK_N columns]`` for dX. ``noise_rows`` are the
    logical rows of the program's output columns (forward) or of the first K-step (dX).

    ``K_AHEAD`` is added last, ``(c0 + k_start) + K_AHEAD``: passing ``k_start + BLOCK_K`` instead
    let the compiler move 35 ALU instructions of the bf16 forward out from under the MMA (sm_90 SASS,
    benchmarks/kernel_budget.py, contract v1: iteration over MMA time 1.77 -> 1.90)."""
    if W_ROWS_ARE_N:
        z = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset + k_start + K_AHEAD, BLOCK_K, FAST_NOISE,
                          NOISE_COLS_ALIGNED)
    else:
        z = gaussian_tile(seed_lo, seed_hi, noise_rows + tl.cast(k_start + K_AHEAD, tl.uint32),
                          noise_col_offset + n_start, BLOCK_N, FAST_NOISE, NOISE_COLS_ALIGNED)
    return z


@triton.jit
def _a_tile(a_ptr, offs_m, m_ok, k_start, K, stride_am, stride_ak, compute_dtype: tl.constexpr,
            MANUAL_BF16_ROUNDING: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The ``[BLOCK_M, BLOCK_K]`` tile of ``a`` at ``k_start`` (0 past K), rounded to ``compute_dtype``.
    With ``EVEN_K`` nothing is masked (no predicates, no zero fill): the caller's ``offs_m`` are clamped
    to the last row, so rows past M repeat it, for output rows that are never stored."""
    offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
    pointers = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    if EVEN_K:
        a = tl.load(pointers)
    else:
        a = tl.load(pointers, mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0)
    return round_to(a, compute_dtype, MANUAL_BF16_ROUNDING)


@triton.jit
def _weight_tile(w_ptr, absmax_ptr, codebook_ptr, row_std_ptr, std_n, n_start, k_start, N, K, stride_wi, stride_wj,
                 W_ROWS_ARE_N: tl.constexpr, HAS_NOISE: tl.constexpr, EVEN_K: tl.constexpr, WEIGHT_4BIT: tl.constexpr,
                 QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr, DEQUANT_DTYPE: tl.constexpr,
                 DEQUANT_MANUAL_ROUNDING: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """W's tile of the K-step at ``k_start`` in W's orientation (dense, or 4-bit dequantized; 0 past the
    weight, or with ``EVEN_K`` other values past N, which only unstored outputs read) and the c of its
    rows, as a column for the tile: forward the tile at ``(n_start, k_start)``, ``[BLOCK_N, BLOCK_K]``,
    with the output columns' ``std_n``; for dX the tile at ``(k_start, n_start)``, ``[BLOCK_K, BLOCK_N]``,
    with the c of the K-step's rows."""
    if W_ROWS_ARE_N:
        w = load_weight_tile(w_ptr, n_start, k_start, N, K, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                             BLOCK_N, BLOCK_K, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                             DEQUANT_MANUAL_ROUNDING, WHOLE_COLS=EVEN_K and not WEIGHT_4BIT)
        std = std_n[:, None] if HAS_NOISE else 0.0
    else:
        w = load_weight_tile(w_ptr, k_start, n_start, K, N, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                             BLOCK_K, BLOCK_N, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                             DEQUANT_MANUAL_ROUNDING, WHOLE_ROWS=EVEN_K and not WEIGHT_4BIT)
        if HAS_NOISE:
            offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
            if EVEN_K:
                std = tl.load(row_std_ptr + offs_k)[:, None]
            else:
                std = tl.load(row_std_ptr + offs_k, mask=offs_k < K, other=0.0)[:, None]
        else:
            std = 0.0
    return w, std


@triton.jit
def _perturbed(w, std, z, compute_dtype: tl.constexpr, W_ROWS_ARE_N: tl.constexpr, HAS_NOISE: tl.constexpr,
               MANUAL_BF16_ROUNDING: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` operand ``op(W + diag(c) Z)`` of one K-step from W's tile ``w`` (in W's
    orientation, see :func:`_weight_tile`), its rows' c ``std`` and their noise ``z``: ``w + c * z`` in
    float32, rounded once to ``compute_dtype``, transposed forward (W's rows are the output columns)."""
    if HAS_NOISE:
        w = w.to(tl.float32) + std * z
    w = round_to(w, compute_dtype, MANUAL_BF16_ROUNDING)
    if W_ROWS_ARE_N:
        w = tl.trans(w)
    return w


def whole_k_steps(inner_size: int, block_k: int) -> bool:
    """``EVEN_K``: the inner size is a positive multiple of the K tile, so no K-step is partial and the
    kernel loads without K masks (an empty K has nothing to load)."""
    return inner_size > 0 and inner_size % block_k == 0


def fast_noise(dtype: torch.dtype) -> bool:
    """Hardware lg2/sin/cos for the noise: on the GPU, for 16-bit compute only.

    There the perturbed weight is rounded to 8 (bf16) or 11 (fp16) bits, far coarser than the
    approximations' effect on Z (``noise.FAST_NOISE_ATOL``); float32 keeps the precise functions so
    its noise matches the reference to a few ulp. The interpreter cannot run inline PTX.
    """
    return not INTERPRETER and dtype != torch.float32


def matmul_constexprs(dtype: torch.dtype, *, forward: bool, blocks: dict, weight_tile: dict, has_noise: bool,
                      has_bias: bool, has_lora: bool, has_keep: bool, rank: int, noise_cols_aligned: bool,
                      even_k: bool, fp32_precision: str) -> dict:
    """Every constexpr of :func:`_perturbed_matmul_kernel` for a launch computing in ``dtype``: the
    direction, which terms exist, the arithmetic switches, whether K is a multiple of BLOCK_K, ``weight_tile``
    (:func:`~flatlora_kernels.triton_ops.quant4bit.tile_constexprs`) and the tile sizes ``blocks``.
    The launcher and the ahead-of-time variants (:mod:`.aot`) both build them here."""
    return dict(W_ROWS_ARE_N=forward, HAS_NOISE=has_noise, HAS_BIAS=has_bias, HAS_LORA=has_lora, HAS_KEEP=has_keep,
                UPCAST_DOT=dot_needs_fp32_operands(dtype), MANUAL_BF16_ROUNDING=cast_needs_manual_rounding(dtype),
                FP32_PRECISION=fp32_precision, FAST_NOISE=fast_noise(dtype), NOISE_COLS_ALIGNED=noise_cols_aligned,
                EVEN_K=even_k, **weight_tile, BLOCK_R=rank_block(rank), **blocks)


def perturbed_matmul_triton(call: PerturbedMatmul, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``call`` on the Triton backend (semantics: :func:`flatlora_kernels.reference.perturbed_matmul`; a dense
    or 4-bit weight, read in place either way), into ``out`` when given: the fused kernel or the slab path
    (:mod:`flatlora_kernels.paths`; "auto" resolved by the table). The first CUDA launch of each fused
    variant in a process is checked against the slab path first (:mod:`.fused_guard`)."""
    from ..paths import triton_path
    from . import fused_guard  # it launches both paths: imported here, once both modules exist
    from .slab import slab_perturbed_matmul

    M, N = call.out_shape
    m, n = call.weight.shape
    if triton_path(call.a.device, M, m, n, call.out_dtype, call.path) == "slab":
        return slab_perturbed_matmul(call, out=out)
    config_name, config = MATMUL_CONFIGS.select(call.out_dtype, M, N,
                                                weight_4bit=isinstance(call.weight, PackedWeight4bit))
    if not fused_guard.variant_passes(call, config_name, config):
        return slab_perturbed_matmul(call, out=out)
    return launch_fused(call, config, out=out)


def launch_fused(call: PerturbedMatmul, config: dict, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The fused kernel for ``call`` with launch configuration ``config`` (an entry of ``MATMUL_CONFIGS``),
    unchecked."""
    M, N = call.out_shape
    if out is None:
        out = torch.empty(M, N, dtype=call.out_dtype, device=call.a.device)
    if M == 0 or N == 0:
        return out
    seed_lo, seed_hi = contract.split_seed(call.seed)
    noise_row_offset, noise_col_offset = call.noise_offset
    # The kernel indexes the (m,) vectors as contiguous; they are tiny, so copy the odd strided one.
    row_std = call.row_std.contiguous() if call.row_std is not None else None
    bias = call.bias.contiguous() if call.bias is not None else None
    w, stride_wi, stride_wj, weight_kwargs = weight_operands(call.weight)
    weight_tile = {k: weight_kwargs.pop(k) for k in tile_constexprs(None)}  # constexprs: one builder for all
    rank = call.lora_hidden.shape[1] if call.lora_hidden is not None else 1
    unused = call.a  # any 2-D tensor stands in for an absent operand; its constexpr flag is off
    hidden = call.lora_hidden if call.lora_hidden is not None else unused
    factor = call.lora_out_factor if call.lora_out_factor is not None else unused
    keep = call.dropout_keep if call.dropout_keep is not None else unused
    blocks, options = launch_options(config)
    grid = (cdiv(M, blocks["BLOCK_M"]) * cdiv(N, blocks["BLOCK_N"]),)
    _perturbed_matmul_kernel[grid](
        a_ptr=call.a, w_ptr=w, row_std_ptr=row_std if row_std is not None else unused,
        bias_ptr=bias if bias is not None else unused, lora_hidden_ptr=hidden, lora_out_factor_ptr=factor,
        dropout_keep_ptr=keep, out_ptr=out, **weight_kwargs,
        M=M, N=N, K=call.inner_size, R=rank,
        stride_am=call.a.stride(0), stride_ak=call.a.stride(1), stride_wi=stride_wi, stride_wj=stride_wj,
        stride_hidden_m=hidden.stride(0), stride_hidden_r=hidden.stride(1),
        stride_factor_r=factor.stride(0), stride_factor_n=factor.stride(1),
        stride_keep_m=keep.stride(0), stride_keep_n=keep.stride(1), stride_om=out.stride(0), stride_on=out.stride(1),
        scaling=float(call.scaling), keep_scale=float(call.keep_scale), seed_lo=seed_lo, seed_hi=seed_hi,
        noise_row_offset=noise_row_offset, noise_col_offset=noise_col_offset,
        **matmul_constexprs(call.out_dtype, forward=call.transpose_weight, blocks=blocks, weight_tile=weight_tile,
                            has_noise=row_std is not None, has_bias=bias is not None,
                            has_lora=call.lora_hidden is not None, has_keep=call.dropout_keep is not None, rank=rank,
                            noise_cols_aligned=noise_col_offset % contract.NORMALS_PER_CALL == 0,
                            even_k=whole_k_steps(call.inner_size, blocks["BLOCK_K"]),
                            fp32_precision=fp32_dot_precision()),
        **options,
    )
    return out
