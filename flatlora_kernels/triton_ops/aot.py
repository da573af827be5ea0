"""Ahead-of-time compilation of every kernel variant for an NVIDIA architecture, no GPU needed.

One list of variants, each with the launch configuration the launchers use on a GPU, shared by
``scripts/compile_for_gpu.py`` (does everything compile?) and ``benchmarks/kernel_budget.py``
(what does the compiled loop cost?). Import it only with ``TRITON_INTERPRET`` unset: under the
interpreter Triton has no compiler to call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .noise import _write_noise_kernel
from .launch_settings import MATMUL_CONFIGS, SLAB_BLOCK, launch_options, row_norms_blocks
from .perturbed_matmul import _perturbed_matmul_kernel, fast_noise, matmul_constexprs
from .quant4bit import tile_constexprs
from .row_norms import _merged_row_norms_kernel
from .slab import _perturbed_slab_kernel

POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
NOISE_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 128}
QUANT_BLOCKSIZE = 64  # the 4-bit variants: QLoRA's usual NF4 blocks (the block size is a constexpr)


def weight_4bit_constexprs(dtype: torch.dtype | None, whole_block_rows: bool = True) -> dict:
    """:func:`~flatlora_kernels.triton_ops.quant4bit.tile_constexprs` for the compiled variants: a 4-bit W
    in ``dtype`` with :data:`QUANT_BLOCKSIZE` blocks, or a dense W when ``dtype`` is None."""
    return tile_constexprs(dtype, QUANT_BLOCKSIZE, whole_block_rows)


@dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: argument types, constexprs and launch options.

    ``role`` is "noise", "row_norms", "forward", "dX" or "slab". For the kernels that regenerate noise,
    ``noise_tile`` is the ``(rows, columns)`` of Z made per program and loop iteration and
    ``token_tile`` how many tokens that one noise tile serves. ``weight_4bit`` marks a variant that
    reads a packed NF4/FP4 W (dequantized in registers).
    """

    name: str
    kernel: object
    types: dict
    constexprs: dict
    options: dict = field(default_factory=dict)
    role: str = ""
    dtype: torch.dtype | None = None
    noise_tile: tuple[int, int] | None = None
    token_tile: int | None = None
    config: str = ""
    divisible_by_16: tuple[str, ...] = ()
    weight_4bit: bool = False

    @property
    def num_warps(self) -> int:
        return self.options.get("num_warps", 4)


def _matmul_types(dtype: torch.dtype, weight_4bit: bool) -> dict:
    return {
        "a_ptr": POINTER_TYPES[dtype], "w_ptr": "*u8" if weight_4bit else POINTER_TYPES[dtype], "row_std_ptr": "*fp32",
        "absmax_ptr": "*fp32", "codebook_ptr": "*fp32",
        "bias_ptr": POINTER_TYPES[dtype], "lora_hidden_ptr": "*fp32", "lora_out_factor_ptr": "*fp32",
        "dropout_keep_ptr": "*i1",
        "out_ptr": POINTER_TYPES[dtype], "M": "i32", "N": "i32", "K": "i32", "R": "i32",
        "scaling": "fp32", "keep_scale": "fp32", "seed_lo": "i64", "seed_hi": "i64",
        "noise_row_offset": "i64", "noise_col_offset": "i64",
        **{name: "i64" for name in _perturbed_matmul_kernel.arg_names if name.startswith("stride_")}}


# What Triton specialises at launch for the usual case (contiguous row-major x, W, dY and output;
# feature sizes and pointers multiples of 16): unit strides become constants, the rest get a
# divisibility hint. Without this the compiled loop would use scalar loads a GPU never runs.
UNIT_STRIDES = ("stride_ak", "stride_wj", "stride_on", "stride_keep_n")
DIVISIBLE_BY_16 = ("a_ptr", "w_ptr", "row_std_ptr", "bias_ptr", "lora_hidden_ptr", "lora_out_factor_ptr",
                   "dropout_keep_ptr", "out_ptr", "absmax_ptr", "codebook_ptr", "N", "K", "stride_am", "stride_wi",
                   "stride_om", "stride_keep_m")


def matmul_variant(dtype: torch.dtype, forward: bool, config_name: str, config: dict,
                   weight_4bit: bool = False, whole_block_rows: bool = True) -> Variant:
    """The perturbed matmul as launched on a GPU for one table entry (see ``MATMUL_CONFIGS``), over
    a dense W or (``weight_4bit``) a packed 4-bit W whose values are in ``dtype``, with rows of whole
    quantization blocks or not."""
    blocks, options = launch_options(config)
    # A LoRA rank of at most 16, fp32 GEMMs on TF32 (torch's allow_tf32 off is the launcher's other choice).
    constexprs = dict(**dict.fromkeys(UNIT_STRIDES, 1), **matmul_constexprs(
        dtype, forward=forward, blocks=blocks, weight_tile=weight_4bit_constexprs(dtype if weight_4bit else None,
                                                                                  whole_block_rows),
        has_noise=True, has_bias=forward, has_lora=True, has_keep=not forward, rank=16, noise_cols_aligned=True,
        even_k=True, fp32_precision="tf32"))
    noise_rows, noise_cols = ((blocks["BLOCK_N"], blocks["BLOCK_K"]) if forward
                              else (blocks["BLOCK_K"], blocks["BLOCK_N"]))
    direction = "forward" if forward else "dX"
    suffix = (f" 4-bit/{QUANT_BLOCKSIZE}" + ("" if whole_block_rows else " straddling")) if weight_4bit else ""
    return Variant(f"perturbed_matmul {direction} {str(dtype).replace('torch.', '')} {config_name}{suffix}",
                   _perturbed_matmul_kernel, _matmul_types(dtype, weight_4bit), constexprs, options, role=direction,
                   dtype=dtype, noise_tile=(noise_rows, noise_cols), token_tile=blocks["BLOCK_M"],
                   config=config_name, divisible_by_16=DIVISIBLE_BY_16, weight_4bit=weight_4bit)


def row_norms_variant(dtype: torch.dtype, weight_4bit: bool = False, noise: bool = False) -> Variant:
    """The merged-norms kernel over a dense ``dtype`` W or a packed 4-bit W dequantized to ``dtype``;
    with ``noise``, of the perturbed merged weight (DoRA's norms, dense W)."""
    name = str(dtype).replace('torch.', '')
    block_m, block_n = row_norms_blocks(weight_4bit)
    return Variant(
        f"row_norms w={name}" + (f" 4-bit/{QUANT_BLOCKSIZE}" if weight_4bit else "") + (" noisy" if noise else ""),
        _merged_row_norms_kernel,
        {"w_ptr": "*u8" if weight_4bit else POINTER_TYPES[dtype], "a_ptr": "*fp32", "b_ptr": "*fp32",
         "row_std_ptr": "*fp32", "out_ptr": "*fp32", "absmax_ptr": "*fp32", "codebook_ptr": "*fp32",
         "M": "i32", "N": "i32", "R": "i32", "scaling": "fp32", "seed_lo": "i64", "seed_hi": "i64",
         "noise_row_offset": "i64", "noise_col_offset": "i64",
         **{s: "i64" for s in ("stride_wm", "stride_wn", "stride_ar", "stride_an", "stride_bm", "stride_br")}},
        dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=16, stride_wn=1, stride_an=1, stride_br=1,
             HAS_NOISE=noise, NOISE_COLS_ALIGNED=True, **weight_4bit_constexprs(dtype if weight_4bit else None)),
        role="row_norms", dtype=dtype, weight_4bit=weight_4bit,
        divisible_by_16=("w_ptr", "a_ptr", "b_ptr", "row_std_ptr", "out_ptr", "absmax_ptr", "codebook_ptr", "N",
                         "stride_wm", "stride_ar"))


def slab_variant(dtype: torch.dtype, weight_4bit: bool = False) -> Variant:
    """The slab writer (:mod:`~flatlora_kernels.triton_ops.slab`) into a ``dtype`` slab, over a dense
    ``dtype`` W or a packed 4-bit W dequantized to ``dtype`` (rows of whole blocks)."""
    blocks, options = launch_options(SLAB_BLOCK)
    name = str(dtype).replace("torch.", "")
    return Variant(
        f"slab {name}" + (f" 4-bit/{QUANT_BLOCKSIZE}" if weight_4bit else ""), _perturbed_slab_kernel,
        {"w_ptr": "*u8" if weight_4bit else POINTER_TYPES[dtype], "row_std_ptr": "*fp32", "out_ptr": POINTER_TYPES[dtype],
         "absmax_ptr": "*fp32", "codebook_ptr": "*fp32", "M": "i32", "N": "i32", "row_start": "i64",
         "col_start": "i64", "slab_rows": "i32", "slab_cols": "i32", "stride_wi": "i64", "stride_wj": "i64",
         "stride_om": "i64", "seed_lo": "i64", "seed_hi": "i64", "noise_row_offset": "i64",
         "noise_col_offset": "i64"},
        dict(stride_wj=1, HAS_NOISE=True, MANUAL_BF16_ROUNDING=False, FAST_NOISE=fast_noise(dtype),
             NOISE_COLS_ALIGNED=True, **blocks, **weight_4bit_constexprs(dtype if weight_4bit else None)),
        options, role="slab", dtype=dtype, noise_tile=(blocks["BLOCK_ROWS"], blocks["BLOCK_COLS"]), config="slab",
        divisible_by_16=("w_ptr", "row_std_ptr", "out_ptr", "absmax_ptr", "codebook_ptr", "N", "stride_wi",
                         "stride_om"), weight_4bit=weight_4bit)


def variants() -> list[Variant]:
    """Every kernel variant a GPU can launch: the noise writer, the norms, the slab writer, and the
    perturbed matmul in both directions for every dtype and every distinct entry of its configuration
    table; and over a 4-bit W (QLoRA, bf16) the norms, the slab writer and both directions of the
    matmul for every 16-bit entry (as the table replaces it for 4-bit weights), for rows of whole
    quantization blocks (every real model) and for blocks that straddle rows."""
    out = [Variant("noise" + (" fast-math" if fast else ""), _write_noise_kernel,
                   {"out_ptr": "*fp32", "M": "i32", "N": "i32", "stride_om": "i32", "stride_on": "i32",
                    "seed_lo": "i64", "seed_hi": "i64", "row_offset": "i64", "col_offset": "i64"},
                   dict(NOISE_BLOCK, FAST_MATH=fast, COLS_ALIGNED=True), role="noise",
                   dtype=torch.float32, noise_tile=(NOISE_BLOCK["BLOCK_M"], NOISE_BLOCK["BLOCK_N"]),
                   config="materialise") for fast in (False, True)]
    for dtype in POINTER_TYPES:
        out.append(row_norms_variant(dtype))
        out.append(row_norms_variant(dtype, noise=True))
        out.append(slab_variant(dtype))
        for forward in (True, False):
            for config_name, config in MATMUL_CONFIGS.distinct(dtype):
                out.append(matmul_variant(dtype, forward, config_name, config))
    out.append(row_norms_variant(torch.bfloat16, weight_4bit=True))
    out.append(slab_variant(torch.bfloat16, weight_4bit=True))
    for forward in (True, False):
        for config_name, config in MATMUL_CONFIGS.distinct(torch.bfloat16, weight_4bit=True):
            for whole_block_rows in (True, False):
                out.append(matmul_variant(torch.bfloat16, forward, config_name, config, weight_4bit=True,
                                          whole_block_rows=whole_block_rows))
    return out


def compile_variant(variant: Variant, arch: int = 90):
    """``triton.compile`` for ``sm_<arch>``; returns the compiled kernel (``.asm`` has ptx and cubin)."""
    signature = {name: ("constexpr" if name in variant.constexprs else variant.types[name])
                 for name in variant.kernel.arg_names}
    attrs = {(variant.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in variant.divisible_by_16}
    source = ASTSource(fn=variant.kernel, signature=signature, constexprs=variant.constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=variant.options)
