"""Public functional API: the noise, the merged filter norms and the Flat-LoRA linear op."""

from __future__ import annotations

from typing import Optional

import torch

from . import checks
from .backends import get_backend
from .distributed import is_dtensor, sharded_merged_row_norms
from .matmul_call import PerturbedMatmul
from .noise import check_seed, seed_from_int64, seed_to_int64
from .paths import check_backend_has_path, requested_path
from .quant4bit import PackedWeight4bit

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, bfloat16, float16")


def _check_lora(weight: torch.Tensor | PackedWeight4bit, lora_A: torch.Tensor | None,
                lora_B: torch.Tensor | None) -> None:
    """The weight and, when given, LoRA factors that fit it (both or neither)."""
    if (lora_A is None) != (lora_B is None):
        raise ValueError("lora_A and lora_B come together: pass both or neither")
    tensors = (("lora_A", lora_A), ("lora_B", lora_B)) if lora_A is not None else ()
    if not isinstance(weight, PackedWeight4bit):
        tensors = (("weight", weight),) + tensors
    for name, t in tensors:
        _check_float(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if t.device != weight.device:
            raise ValueError(f"{name} is on {t.device} but weight is on {weight.device}")
    if lora_A is None:
        return
    m, n = weight.shape
    r = lora_A.shape[0]
    if r == 0:
        raise ValueError("lora_A has rank 0")
    if lora_A.shape[1] != n:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}; expected (r, in_features={n})")
    if tuple(lora_B.shape) != (m, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}; expected (out_features={m}, r={r})")


def check_row_std(row_std: torch.Tensor, weight: torch.Tensor) -> None:
    """Shape, dtype and device of ``c``; its values must be finite and >= 0 (this reads them)."""
    if not isinstance(row_std, torch.Tensor):
        raise TypeError(f"row_std must be a float32 tensor or None, got {type(row_std).__name__}")
    if row_std.dtype != torch.float32 or tuple(row_std.shape) != (weight.shape[0],):
        raise ValueError(f"row_std must be a float32 tensor of shape ({weight.shape[0]},), "
                         f"got {row_std.dtype} {tuple(row_std.shape)}")
    if row_std.device != weight.device:
        raise ValueError(f"row_std is on {row_std.device} but weight is on {weight.device}")
    check_row_std_values(row_std)


def check_row_std_values(row_std: torch.Tensor) -> None:
    """The values of ``c`` must be finite and >= 0 (this reads them)."""
    if not bool(torch.isfinite(row_std).all()) or bool((row_std < 0).any()):
        raise ValueError("row_std must hold finite values >= 0 (got NaN, inf or a negative entry)")


def check_noise_offset(offset: tuple[int, int], rows: int, cols: int) -> tuple[int, int]:
    """``(r0, c0)``: non-negative ints that place a ``rows x cols`` block inside the contract's
    ``2**32 x 2**34`` index space."""
    if not isinstance(offset, (tuple, list)) or len(offset) != 2:
        raise TypeError(f"noise_offset must be a pair (row_offset, col_offset), got {offset!r}")
    row_offset = checks.nonnegative_int("row offset", offset[0])
    col_offset = checks.nonnegative_int("column offset", offset[1])
    if row_offset + rows > 2**32 or col_offset + cols > 2**34:
        raise ValueError(f"a {rows} x {cols} block at offset ({row_offset}, {col_offset}) leaves the noise "
                         "contract's 2**32 x 2**34 index space")
    return row_offset, col_offset


def generate_noise(seed: int, out_features: int, in_features: int, *, device=None,
                   noise_offset: tuple[int, int] = (0, 0), **deprecated) -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` matrix ``Z(seed)`` that the kernels regenerate, or with
    ``noise_offset = (r0, c0)`` its block ``Z(seed)[r0 : r0 + out_features, c0 : c0 + in_features]`` (what a
    tensor-parallel shard whose first element is ``(r0, c0)`` of the logical weight regenerates).

    See :mod:`flatlora_kernels.noise` for the exact definition: noise contract version
    ``noise.CONTRACT_VERSION`` (2: eight normals per Philox4x32-10 call from 16-bit uniforms,
    ``|Z| <= 4.85``). This materialises it, with the precise ``ln``/``sin``/``cos``; the training paths
    never materialise it, and the fused 16-bit GPU kernels evaluate those three with hardware
    approximations, within ``noise.FAST_NOISE_ATOL`` of this.
    """
    noise_offset = checks.renamed_argument("generate_noise", deprecated, "offset", "noise_offset",
                                           noise_offset, (0, 0))
    check_seed(seed)
    out_features = checks.nonnegative_int("out_features", out_features)
    in_features = checks.nonnegative_int("in_features", in_features)
    offset = check_noise_offset(noise_offset, out_features, in_features)
    device = torch.device("cpu" if device is None else device)
    return get_backend(device).noise(seed, out_features, in_features, device, offset=offset)


def merged_row_norms(weight: torch.Tensor | PackedWeight4bit, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float, *, seed: int | None = None, row_std: torch.Tensor | None = None,
                     noise_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """``||W[i, :] + scaling * B[i, :] @ A||_2`` for every row, float32 ``(m,)``, never forming ``B @ A``.

    ``weight`` is the logical ``(out_features, in_features)`` matrix (a transposed view is fine).
    A sharded ``DTensor`` weight (FSDP2, tensor parallelism) is reduced across its mesh without
    being gathered (:mod:`flatlora_kernels.distributed`); a 4-bit base is dequantized tile by tile
    in registers by the Triton kernel, else a block of rows at a time by the reference. Not
    differentiable: it is a statistic of the current weights.

    With ``row_std`` (and ``seed``), the norms of the *perturbed* merged weight
    ``W + diag(row_std) Z(seed)[r0:, c0:] + scaling * B A`` (``(r0, c0) = noise_offset``), the noise
    regenerated tile by tile in the Triton kernel, else a block of rows at a time: what DoRA divides
    by under Flat-LoRA. Dense, unsharded weights only.
    """
    _check_lora(weight, lora_A, lora_B)
    scaling = checks.finite_real("scaling", scaling)
    if row_std is not None:
        if isinstance(weight, PackedWeight4bit) or is_dtensor(weight):
            raise NotImplementedError("merged_row_norms with row_std takes a dense, unsharded weight, got "
                                      f"{type(weight).__name__}")
        check_seed(seed)
        check_row_std(row_std, weight)
        noise_offset = check_noise_offset(noise_offset, *weight.shape)
    return _merged_row_norms(weight, lora_A, lora_B, scaling, seed=seed, row_std=row_std, noise_offset=noise_offset)


def _merged_row_norms(weight: torch.Tensor | PackedWeight4bit, lora_A: torch.Tensor, lora_B: torch.Tensor,
                      scaling: float, *, seed: int | None = None, row_std: torch.Tensor | None = None,
                      noise_offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """:func:`merged_row_norms` on arguments the caller has checked (the layer, once per sample)."""
    lora_A, lora_B = lora_A.detach(), lora_B.detach()
    with torch.no_grad():
        if isinstance(weight, PackedWeight4bit):
            return get_backend(weight.device, weight).row_norms(weight, lora_A, lora_B, scaling)
        row_norms = get_backend(weight.device).row_norms
        if is_dtensor(weight):
            return sharded_merged_row_norms(weight.detach(), lora_A, lora_B, scaling, row_norms)
        if row_std is None:
            return row_norms(weight.detach(), lora_A, lora_B, scaling)
        return row_norms(weight.detach(), lora_A, lora_B, scaling, seed=seed, row_std=row_std,
                         noise_offset=noise_offset)


@torch.library.custom_op("flatlora::perturbed_matmul", mutates_args=())
def perturbed_matmul_op(
    a: torch.Tensor, weight: torch.Tensor, transpose_weight: bool, seed: int, row_std: Optional[torch.Tensor],
    out_dtype: torch.dtype, bias: Optional[torch.Tensor], lora_hidden: Optional[torch.Tensor],
    lora_out_factor: Optional[torch.Tensor], scaling: float, dropout_keep: Optional[torch.Tensor],
    keep_scale: float, path: str, noise_row_offset: int, noise_col_offset: int,
) -> torch.Tensor:
    """The registered operator behind the layer: one opaque node for ``torch.compile``. Its arguments are
    the fields of :class:`~flatlora_kernels.matmul_call.PerturbedMatmul` in order (an operator takes
    tensors and scalars: the seed as a signed int64, the noise offset as two ints); it runs the
    selected backend on that call."""
    call = _call_from_op_arguments(a, weight, transpose_weight, seed, row_std, out_dtype, bias, lora_hidden,
                                   lora_out_factor, scaling, dropout_keep, keep_scale, path, noise_row_offset,
                                   noise_col_offset)
    return _run_backend(call)


def _run_backend(call: PerturbedMatmul) -> torch.Tensor:
    """``call`` on the backend for its device. The path ("auto" resolved per call by the table) is
    chosen here, inside the op, so that ``torch.compile`` never traces the choice."""
    backend = get_backend(call.a.device, call.weight)
    check_backend_has_path(call.path, backend.name, call.a.device)
    return backend.perturbed_matmul(call)


def _call_from_op_arguments(a, weight, transpose_weight, seed, *fields_after_seed) -> PerturbedMatmul:
    """The call :func:`perturbed_matmul_op`'s arguments describe (its fake reads the shapes from it too)."""
    *fields, noise_row_offset, noise_col_offset = fields_after_seed
    return PerturbedMatmul(a, weight, transpose_weight, seed_from_int64(seed), *fields,
                           noise_offset=(noise_row_offset, noise_col_offset))


@perturbed_matmul_op.register_fake
def _perturbed_matmul_fake(*arguments):
    call = _call_from_op_arguments(*arguments)
    return call.a.new_empty(call.out_shape, dtype=call.out_dtype)


def _perturbed_matmul(call: PerturbedMatmul) -> torch.Tensor:
    """The registered op for a dense weight; a 4-bit base (a dataclass, which the op cannot take)
    calls its backend directly: the fused Triton kernel or the slab path, or the reference's row-block path."""
    if isinstance(call.weight, PackedWeight4bit):
        return _run_backend(call)
    return perturbed_matmul_op(call.a, call.weight, call.transpose_weight, seed_to_int64(call.seed), call.row_std,
                               call.out_dtype, call.bias, call.lora_hidden, call.lora_out_factor, call.scaling,
                               call.dropout_keep, call.keep_scale, call.path, *call.noise_offset)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class FlatLoraLinearFunction(torch.autograd.Function):
    """``y = x (W + diag(c) Z)^T + bias + s * (dropout(x) A^T) B^T`` on 2-D ``x``.

    Saves ``x``, the small ``(tokens, r)`` LoRA activation, the dropout mask and references to
    the parameters: nothing of size ``out_features x in_features``. ``W`` may be a 4-bit base
    (:class:`~flatlora_kernels.quant4bit.PackedWeight4bit`), dequantized tile by tile in the Triton
    kernels, else a block of rows at a time.
    Without LoRA factors (``lora_A = lora_B = None``) it is the perturbed base linear alone.
    ``noise_offset`` is where ``W`` starts in the logical weight (a tensor-parallel shard); ``path``
    is the one asked for ("auto", "fused" or "slab"): both passes resolve it alike (same sizes and dtype).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, seed, row_std, dropout_p,
                compute_dtype, lora_dtype, noise_offset, path):
        keep = lora_hidden = None
        if lora_A is not None:
            x_lora = x.to(lora_dtype)
            if dropout_p > 0:
                # The dropout mask comes from torch's generator, exactly like PEFT's nn.Dropout.
                keep = torch.rand(x.shape, device=x.device) >= dropout_p
                x_lora = x_lora * keep * (1.0 / (1.0 - dropout_p))
            lora_hidden = x_lora @ lora_A.to(lora_dtype).t()
        y = _perturbed_matmul(PerturbedMatmul(
            x, weight, transpose_weight=True, seed=seed_from_int64(seed), row_std=row_std, out_dtype=compute_dtype,
            bias=bias, lora_hidden=lora_hidden, lora_out_factor=None if lora_B is None else lora_B.t(),
            scaling=scaling, path=path, noise_offset=noise_offset))
        packed = isinstance(weight, PackedWeight4bit)
        ctx.packed_weight = weight if packed else None  # not a tensor: kept by reference, like a parameter
        ctx.save_for_backward(x, None if packed else weight, lora_A, lora_B, row_std, keep, lora_hidden)
        ctx.config = (scaling, seed, dropout_p, compute_dtype, lora_dtype, None if bias is None else bias.dtype,
                      noise_offset, path)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B, row_std, keep, lora_hidden = ctx.saved_tensors
        if ctx.packed_weight is not None:
            weight = ctx.packed_weight
        scaling, seed, dropout_p, compute_dtype, lora_dtype, bias_dtype, noise_offset, path = ctx.config
        keep_scale = 1.0 / (1.0 - dropout_p)
        with torch.autocast(x.device.type, enabled=False):
            grad_lora = grad_y.to(lora_dtype)
            # dL/d(x_lora A^T) / scaling
            grad_hidden = None if lora_B is None else grad_lora @ lora_B.to(lora_dtype)
            grad_x = grad_A = grad_B = grad_bias = None
            if ctx.needs_input_grad[0]:
                grad_x = _perturbed_matmul(PerturbedMatmul(
                    grad_y, weight, transpose_weight=False, seed=seed_from_int64(seed), row_std=row_std,
                    out_dtype=compute_dtype, lora_hidden=grad_hidden, lora_out_factor=lora_A, scaling=scaling,
                    dropout_keep=keep, keep_scale=keep_scale, path=path, noise_offset=noise_offset)).to(x.dtype)
            if ctx.needs_input_grad[3]:
                x_lora = x.to(lora_dtype)
                if keep is not None:
                    x_lora = x_lora * keep * keep_scale
                grad_A = (scaling * (grad_hidden.t() @ x_lora)).to(lora_A.dtype)
            if ctx.needs_input_grad[4]:
                grad_B = (scaling * (grad_lora.t() @ lora_hidden)).to(lora_B.dtype)
            if bias_dtype is not None and ctx.needs_input_grad[2]:
                grad_bias = grad_y.float().sum(0).to(bias_dtype)
        return grad_x, None, grad_bias, grad_A, grad_B, None, None, None, None, None, None, None, None


def flat_lora_linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight4bit, bias: torch.Tensor | None,
                     lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, *, seed: int,
                     row_std: torch.Tensor | None, dropout_p: float = 0.0,
                     noise_offset: tuple[int, int] = (0, 0), path: str = "auto") -> torch.Tensor:
    """LoRA linear layer evaluated at the perturbed merged weight ``W + diag(row_std) Z(seed) + s·BA``.

    Args:
        x: input ``(..., in_features)``.
        weight: frozen base weight, logical shape ``(out_features, in_features)``; only read. A
            4-bit base (:meth:`PackedWeight4bit.from_bnb <flatlora_kernels.quant4bit.PackedWeight4bit.from_bnb>`)
            is dequantized and perturbed tile by tile in registers by the Triton backend, else a
            bounded block of rows at a time.
        bias: ``(out_features,)`` or None; gets a gradient if it requires one.
        lora_A, lora_B: ``(r, in_features)`` and ``(out_features, r)``, or both None for the
            perturbed base layer alone (``x (W + diag(c) Z)^T + bias``).
        scaling: the LoRA scale ``s``.
        seed: 64-bit noise seed (Python int in ``[0, 2**64)``).
        row_std: float32 ``(out_features,)`` per-row noise std ``c`` (finite, >= 0), or None for
            plain LoRA.
        dropout_p: dropout on the LoRA path only, as in PEFT (pass 0 in eval).
        noise_offset: ``(r0, c0)`` when ``weight`` is the block of a larger logical weight that starts
            at row ``r0`` and column ``c0`` (a tensor-parallel shard): it is perturbed with
            ``Z(seed)[r0 : r0 + out_features, c0 : c0 + in_features]``, the noise the whole weight has there.
        path: "auto", "fused" or "slab": how the Triton backend forms the perturbed product (see
            :mod:`flatlora_kernels.paths`; ``FLATLORA_PATH`` overrides it, :func:`~flatlora_kernels.path_name`
            tells which one a call takes). Same values either way, up to summation order and the slab
            path's second rounding of the LoRA term in 16-bit.

    Returns ``(..., out_features)`` in the input's dtype, or the autocast dtype under autocast.
    Differentiable in ``x``, ``lora_A``, ``lora_B`` and ``bias``; the noise is regenerated, not
    stored, in the backward pass.
    """
    if row_std is not None:
        _check_lora(weight, lora_A, lora_B)
        check_row_std(row_std, weight)
    return _flat_lora_linear(x, weight, bias, lora_A, lora_B, scaling, seed=seed, row_std=row_std,
                             dropout_p=dropout_p, noise_offset=noise_offset, path=path)


def _flat_lora_linear(x: torch.Tensor, weight: torch.Tensor | PackedWeight4bit, bias: torch.Tensor | None,
                      lora_A: torch.Tensor | None, lora_B: torch.Tensor | None, scaling: float, *, seed: int,
                      row_std: torch.Tensor | None, dropout_p: float = 0.0,
                      noise_offset: tuple[int, int] = (0, 0), path: str = "auto") -> torch.Tensor:
    """:func:`flat_lora_linear` without reading ``row_std``'s values, for callers inside the package
    that built ``c`` themselves: the layer (checked once per sample, not per call) and the
    flatness toolkit (whose signed steps along a direction need negative ``c``)."""
    _check_float("x", x)
    _check_lora(weight, lora_A, lora_B)
    m, n = weight.shape
    if n == 0:
        raise ValueError(f"weight has shape {tuple(weight.shape)}: in_features must be >= 1 (an empty input "
                         "dimension has nothing to multiply)")
    if x.dim() == 0 or x.shape[-1] != n:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features={n}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        raise ValueError("weight requires grad, but Flat-LoRA keeps the base weight frozen and "
                         "computes no gradient for it; call weight.requires_grad_(False)")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (m,) or bias.device != weight.device:
            raise ValueError(f"bias must have shape ({m},) on {weight.device}, "
                             f"got {tuple(bias.shape)} on {bias.device}")
    scaling = checks.finite_real("scaling", scaling)
    seed64 = seed_to_int64(seed)
    dropout_p = checks.probability("dropout_p", dropout_p)
    noise_offset = check_noise_offset(noise_offset, m, n)

    autocast_dtype = _autocast_dtype(x.device.type)
    compute_dtype = autocast_dtype or x.dtype
    lora_dtype = autocast_dtype or (x.dtype if lora_A is None else lora_A.dtype)
    if compute_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"autocast dtype {compute_dtype} is not supported")
    x2 = x.reshape(-1, n)
    path = requested_path(path)
    with torch.autocast(x.device.type, enabled=False):
        y = FlatLoraLinearFunction.apply(x2, weight, bias, lora_A, lora_B, scaling, seed64, row_std,
                                         dropout_p, compute_dtype, lora_dtype, noise_offset, path)
    return y.reshape(*x.shape[:-1], m)
