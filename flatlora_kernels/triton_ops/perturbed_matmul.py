"""The perturbed matmul: ``a @ op(W + diag(c) Z)`` with the LoRA term fused into the epilogue.

One kernel serves both directions of the Flat-LoRA linear layer:

* forward (``W_ROWS_ARE_N``):  ``y  = x  @ (W + diag(c) Z)^T + bias + s * (u @ B^T)``,
  with ``u = dropout(x) @ A^T``;
* backward dX:                 ``dx = dy @ (W + diag(c) Z) + s * (g @ A) * keep / (1 - p)``,
  with ``g = dy @ B``.

In both, each W tile is loaded once per token tile, its noise tile is regenerated in
registers from the seed (:func:`gaussian_tile`), added in float32 and rounded to the compute
dtype, then fed to ``tl.dot``. W is never written and no noise reaches memory.

W may be a 4-bit (NF4/FP4) base (``WEIGHT_4BIT``): its tile is then dequantized in registers from
the packed codes and block scales (:func:`~flatlora_kernels.triton_ops.quant4bit.load_weight_tile`),
rounded to the weight's dtype as bitsandbytes does, and the noise is added to that, so
``dequant(W4) + diag(c) Z`` exists only tile by tile.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .. import noise as contract
from ..quant4bit import PackedWeight4bit
from .common import (INTERPRETER, cast_needs_manual_rounding, cdiv, dot_needs_fp32_operands,
                     fp32_dot_precision, round_to)
from .noise import gaussian_tile
from .quant4bit import load_weight_tile, weight_operands
from .row_norms import rank_block


@triton.jit(do_not_specialize=["seed_lo", "seed_hi"])
def _perturbed_matmul_kernel(
    a_ptr, w_ptr, row_std_ptr, bias_ptr, left_ptr, right_ptr, keep_ptr, out_ptr,
    M, N, K, R,
    stride_am, stride_ak, stride_wi, stride_wj,
    stride_lm, stride_lr, stride_rr, stride_rn,
    stride_km, stride_kn, stride_om, stride_on,
    scaling, keep_scale, seed_lo, seed_hi, noise_row_offset, noise_col_offset, absmax_ptr, codebook_ptr,
    W_ROWS_ARE_N: tl.constexpr,  # True: output columns are W rows (forward); False: W columns (dX)
    HAS_NOISE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, HAS_KEEP: tl.constexpr,
    UPCAST_DOT: tl.constexpr, MANUAL_BF16_ROUNDING: tl.constexpr, FP32_PRECISION: tl.constexpr,
    FAST_NOISE: tl.constexpr, NOISE_COLS_ALIGNED: tl.constexpr, WEIGHT_4BIT: tl.constexpr,
    QUANT_BLOCKSIZE: tl.constexpr, WHOLE_BLOCK_ROWS: tl.constexpr, DEQUANT_DTYPE: tl.constexpr,
    DEQUANT_MANUAL_ROUNDING: tl.constexpr,
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
    if HAS_NOISE and W_ROWS_ARE_N:
        std_n = tl.load(row_std_ptr + offs_n, mask=n_ok, other=0.0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Software pipelining by hand: the noise of K-step k + 1 is generated after step k's tl.dot, so
    # the compiler can issue it while that step's asynchronous wgmma runs (the loop ends with one
    # unused tile, past K). Tile for step k: [BLOCK_N W rows, BLOCK_K columns] forward (used
    # transposed), [BLOCK_K W rows, BLOCK_N columns] for dX. W is the block of the logical matrix
    # that starts at (noise_row_offset, noise_col_offset) (a tensor-parallel shard; (0, 0) otherwise),
    # so Z is indexed from there. Rows are formed in uint32 (the contract's counter word; i < 2**32).
    if HAS_NOISE:
        if NOISE_COLS_ALIGNED:
            noise_col_offset = tl.multiple_of(noise_col_offset, 4)
        noise_rows = tl.cast(noise_row_offset, tl.uint32) + (offs_n if W_ROWS_ARE_N else tl.arange(0, BLOCK_K)).to(tl.uint32)
        if W_ROWS_ARE_N:
            z_next = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset, BLOCK_K, FAST_NOISE,
                                   NOISE_COLS_ALIGNED)
        else:
            z_next = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset + n_start, BLOCK_N, FAST_NOISE,
                                   NOISE_COLS_ALIGNED)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_ok = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = round_to(a, compute_dtype, MANUAL_BF16_ROUNDING)
        if W_ROWS_ARE_N:
            w = load_weight_tile(w_ptr, n_start, k_start, N, K, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                                 BLOCK_N, BLOCK_K, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                                 DEQUANT_MANUAL_ROUNDING)
            if HAS_NOISE:
                w = w.to(tl.float32) + std_n[:, None] * z_next
            w = tl.trans(round_to(w, compute_dtype, MANUAL_BF16_ROUNDING))
        else:
            w = load_weight_tile(w_ptr, k_start, n_start, K, N, stride_wi, stride_wj, absmax_ptr, codebook_ptr,
                                 BLOCK_K, BLOCK_N, WEIGHT_4BIT, QUANT_BLOCKSIZE, WHOLE_BLOCK_ROWS, DEQUANT_DTYPE,
                                 DEQUANT_MANUAL_ROUNDING)
            if HAS_NOISE:
                std_k = tl.load(row_std_ptr + offs_k, mask=k_ok, other=0.0)
                w = w.to(tl.float32) + std_k[:, None] * z_next
            w = round_to(w, compute_dtype, MANUAL_BF16_ROUNDING)
        if UPCAST_DOT:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(a, w, acc, input_precision=FP32_PRECISION)
        if HAS_NOISE:
            if W_ROWS_ARE_N:
                z_next = gaussian_tile(seed_lo, seed_hi, noise_rows, noise_col_offset + k_start + BLOCK_K, BLOCK_K,
                                       FAST_NOISE, NOISE_COLS_ALIGNED)
            else:
                z_next = gaussian_tile(seed_lo, seed_hi, noise_rows + tl.cast(k_start + BLOCK_K, tl.uint32),
                                       noise_col_offset + n_start, BLOCK_N, FAST_NOISE, NOISE_COLS_ALIGNED)

    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)
        rank_ok = ranks < R
        left = tl.load(left_ptr + offs_m[:, None] * stride_lm + ranks[None, :] * stride_lr,
                       mask=m_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)
        right = tl.load(right_ptr + ranks[:, None] * stride_rr + offs_n[None, :] * stride_rn,
                        mask=rank_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
        lora = tl.dot(left, right, input_precision="ieee") * scaling
        if HAS_KEEP:
            keep = tl.load(keep_ptr + offs_m[:, None] * stride_km + offs_n[None, :] * stride_kn,
                           mask=m_ok[:, None] & n_ok[None, :], other=0)
            lora = lora * (keep.to(tl.float32) * keep_scale)
        acc += lora
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             round_to(acc, compute_dtype, MANUAL_BF16_ROUNDING), mask=m_ok[:, None] & n_ok[None, :])


class MatmulConfigTable:
    """Launch configurations of the perturbed matmul, chosen per (dtype, shape class, token class).

    * dtype class: "fp32" or "16bit" (bf16/fp16);
    * shape class: "narrow" when the output has fewer than 128 columns, else "wide";
    * token class: "decode" for at most 64 token rows, else "bulk".

    ``configs`` maps a name to block sizes and launch options; ``entries`` maps each class triple to
    a name; ``packed`` replaces some of those names for a 4-bit W, whose in-register dequantization
    needs registers of its own. Under the interpreter every launch uses the small "interpreter" blocks unless a test
    forces a table entry with :meth:`force` (so each GPU configuration also runs on the CPU).
    """

    CLASSES = [(d, s, t) for d in ("fp32", "16bit") for s in ("narrow", "wide") for t in ("decode", "bulk")]

    def __init__(self, configs: dict[str, dict], entries: dict[tuple[str, str, str], str],
                 packed: dict[str, str] | None = None):
        missing = [key for key in self.CLASSES if key not in entries]
        if missing:
            raise ValueError(f"configuration table has no entry for {missing}")
        packed = packed or {}
        unknown = sorted((set(entries.values()) | set(packed) | set(packed.values())) - set(configs))
        if unknown:
            raise ValueError(f"configuration table names unknown configurations {unknown}")
        self.configs = configs
        self.entries = entries
        self.packed = packed
        self._forced: str | None = None

    @staticmethod
    def classify(dtype: torch.dtype, tokens: int, out_columns: int) -> tuple[str, str, str]:
        return ("fp32" if dtype == torch.float32 else "16bit", "narrow" if out_columns < 128 else "wide",
                "decode" if tokens <= 64 else "bulk")

    def select(self, dtype: torch.dtype, tokens: int, out_columns: int,
               weight_4bit: bool = False) -> tuple[str, dict]:
        if self._forced is not None:
            return self._forced, self.configs[self._forced]
        if INTERPRETER:
            return "interpreter", INTERPRETER_CONFIG
        name = self.entries[self.classify(dtype, tokens, out_columns)]
        if weight_4bit:
            name = self.packed.get(name, name)
        return name, self.configs[name]

    def distinct(self, dtype: torch.dtype, weight_4bit: bool = False) -> list[tuple[str, dict]]:
        """The configurations a GPU can launch for ``dtype`` (over a 4-bit W with ``weight_4bit``), each once."""
        dtype_class = "fp32" if dtype == torch.float32 else "16bit"
        names = dict.fromkeys(self.packed.get(name, name) if weight_4bit else name
                              for key, name in self.entries.items() if key[0] == dtype_class)
        return [(name, self.configs[name]) for name in names]

    @contextlib.contextmanager
    def force(self, name: str):
        """Test-only: launch every perturbed matmul with configuration ``name``, interpreter included."""
        if name not in self.configs:
            raise KeyError(f"no configuration named {name!r}; known: {sorted(self.configs)}")
        previous, self._forced = self._forced, name
        try:
            yield self.configs[name]
        finally:
            self._forced = previous


INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, num_warps=4)
# Chosen from the static SASS budget (benchmarks/kernel_budget.py, benchmarks/NOTES.md section 1),
# by predicted iteration time over MMA time: the noise of a W tile costs the same whatever BLOCK_M
# is, so bulk 16-bit launches serve 256 tokens per regenerated tile; decode-like launches (<= 64
# tokens) use 64-token tiles and 64 W rows so more programs cover W. None has local-memory traffic
# in its K-loop on sm_90. Not yet timed on a GPU. Over a 4-bit W (rows of whole quantization
# blocks), "16bit-bulk-wide" spills in the K-loop (the dequantization's codes and scales on top of
# its 256 x 128 accumulator), so wide outputs take the narrow bulk tiles too.
MATMUL_CONFIGS = MatmulConfigTable(
    configs={
        "fp32-bulk": dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
        "fp32-decode": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, num_warps=4, num_stages=3),
        "16bit-bulk-wide": dict(BLOCK_M=256, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=4),
        "16bit-bulk-narrow": dict(BLOCK_M=256, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=3),
        "16bit-decode": dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    },
    entries={
        **{("fp32", shape, "bulk"): "fp32-bulk" for shape in ("narrow", "wide")},
        **{("fp32", shape, "decode"): "fp32-decode" for shape in ("narrow", "wide")},
        ("16bit", "wide", "bulk"): "16bit-bulk-wide",
        ("16bit", "narrow", "bulk"): "16bit-bulk-narrow",
        **{("16bit", shape, "decode"): "16bit-decode" for shape in ("narrow", "wide")},
    },
    packed={"16bit-bulk-wide": "16bit-bulk-narrow"},
)


def fast_noise(dtype: torch.dtype) -> bool:
    """Hardware lg2/sin/cos for the noise: on the GPU, for 16-bit compute only.

    There the perturbed weight is rounded to 8 (bf16) or 11 (fp16) bits, far coarser than the
    approximations' effect on Z (``noise.FAST_NOISE_ATOL``); float32 keeps the precise functions so
    its noise matches the reference to a few ulp. The interpreter cannot run inline PTX.
    """
    return not INTERPRETER and dtype != torch.float32


def launch_options(config: dict) -> tuple[dict, dict]:
    """Split a configuration into kernel block sizes and launch options (num_warps, num_stages)."""
    blocks = {k: v for k, v in config.items() if k not in ("num_warps", "num_stages")}
    return blocks, {k: v for k, v in config.items() if k in ("num_warps", "num_stages")}


def perturbed_matmul_triton(
    a: torch.Tensor, weight: torch.Tensor | PackedWeight4bit, *, transpose_weight: bool, seed: int,
    row_std: torch.Tensor | None, bias: torch.Tensor | None, lora_left: torch.Tensor | None,
    lora_right: torch.Tensor | None, scaling: float, keep: torch.Tensor | None, keep_scale: float,
    out_dtype: torch.dtype, noise_offset: tuple[int, int] = (0, 0), out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Launch the kernel; the semantics are those of :func:`flatlora_kernels.reference.perturbed_matmul`
    (``weight`` dense or 4-bit, read in place either way)."""
    seed_lo, seed_hi = contract.split_seed(seed)
    noise_row_offset, noise_col_offset = noise_offset
    m_w, n_w = weight.shape
    M = a.shape[0]
    N, K = (m_w, n_w) if transpose_weight else (n_w, m_w)
    if out is None:
        out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    # The kernel indexes the (m,) vectors as contiguous; they are tiny, so copy the odd strided one.
    row_std = row_std.contiguous() if row_std is not None else None
    bias = bias.contiguous() if bias is not None else None
    has_lora = lora_left is not None
    r = lora_left.shape[1] if has_lora else 1
    w, stride_wi, stride_wj, weight_kwargs = weight_operands(weight)
    unused = a  # any 2-D tensor stands in for an absent operand; its constexpr flag is off
    left = lora_left if has_lora else unused
    right = lora_right if has_lora else unused
    keep_t = keep if keep is not None else unused
    cfg = dict(MATMUL_CONFIGS.select(out_dtype, M, N, weight_4bit=isinstance(weight, PackedWeight4bit))[1])
    grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),)
    _perturbed_matmul_kernel[grid](
        a, w, row_std if row_std is not None else unused, bias if bias is not None else unused,
        left, right, keep_t, out,
        M, N, K, r,
        a.stride(0), a.stride(1), stride_wi, stride_wj,
        left.stride(0), left.stride(1), right.stride(0), right.stride(1),
        keep_t.stride(0), keep_t.stride(1), out.stride(0), out.stride(1),
        float(scaling), float(keep_scale), seed_lo, seed_hi, noise_row_offset, noise_col_offset, **weight_kwargs,
        W_ROWS_ARE_N=transpose_weight, HAS_NOISE=row_std is not None, HAS_BIAS=bias is not None,
        HAS_LORA=has_lora, HAS_KEEP=keep is not None,
        UPCAST_DOT=dot_needs_fp32_operands(out_dtype),
        MANUAL_BF16_ROUNDING=cast_needs_manual_rounding(out_dtype), FP32_PRECISION=fp32_dot_precision(),
        FAST_NOISE=fast_noise(out_dtype), NOISE_COLS_ALIGNED=noise_col_offset % contract.NORMALS_PER_CALL == 0, BLOCK_R=rank_block(r), **cfg,
    )
    return out
