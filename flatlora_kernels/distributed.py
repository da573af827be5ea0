"""Filter norms of sharded weights: FSDP2 (``fully_shard``) and tensor-parallel ``DTensor`` weights.

Outside the forward pass FSDP2 keeps each parameter as a ``DTensor`` sharded by rows, and tensor
parallelism shards base weights by rows or columns. The filter norms ``||W_i + s·B_i A||`` need
every column of a row, so they are built from **sharded partial sums reduced across ranks**:

1. the LoRA factors are gathered whole (``r·(m + n)`` elements: small);
2. each rank takes the block of the logical ``(out, in)`` matrix it holds, rows ``[r0, r1)`` and
   columns ``[c0, c1)``, and computes the squared norms of ``W_block + s·B[r0:r1] A[:, c0:c1]`` with
   the local backend (the fused norms kernel on CUDA), placing them at rows ``r0:r1`` of an
   ``(m,)`` vector of zeros;
3. those vectors are summed over the mesh dimensions the weight is sharded along (one all-reduce of
   ``m`` floats each), and the square root gives the norms, the same on every rank.

``W`` itself is never gathered. This is a collective: every rank of the mesh must call it, in
the same order (the :class:`~flatlora_kernels.FlatLora` controller resamples its layers in one
fixed order on every rank).

The noise is a function of the global ``(i, j)`` only. FSDP2 runs the forward on the unsharded
weight, so nothing changes there. Under tensor parallelism the weight stays sharded in the
forward: :func:`tensor_parallel_perturbed_linear` multiplies each rank's shard, perturbed by the
block of ``Z`` at the shard's offset, and returns the ``DTensor`` that ``F.linear`` would.
"""

from __future__ import annotations

from typing import Callable

import torch

from .noise import seed_to_int64


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (False where torch has no distributed support)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def local_block(weight: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """The local shard of a ``DTensor`` ``(out, in)`` matrix and its offset ``(r0, c0)`` in the logical
    matrix (empty shards too); Shard and Replicate placements only."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for placement in weight.placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise NotImplementedError(f"a weight with placement {placement} (only Shard and Replicate placements "
                                      "are supported)")
    _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
    return weight.to_local(), (int(offset[0]), int(offset[1]))


def sharded_merged_row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             local_row_norms: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``||W_i + s·B_i A||_2`` for every row of a ``DTensor`` weight (see the module docstring).

    ``weight`` is the logical ``(out, in)`` DTensor (a transposed view of a ``Conv1D`` weight is
    fine: its shard is then a block of columns); ``lora_A``/``lora_B`` may be DTensors or plain
    tensors. ``local_row_norms(weight, lora_A, lora_B, scaling)`` is the backend's single-device
    norms op. Returns a plain float32 ``(m,)`` tensor, replicated on every rank.
    """
    from torch.distributed.tensor import Shard

    mesh, placements = weight.device_mesh, weight.placements
    local, (r0, c0) = local_block(weight)
    rows, cols = local.shape
    lora_A, lora_B = _whole(lora_A), _whole(lora_B)
    sums = torch.zeros(weight.shape[0], dtype=torch.float32, device=local.device)
    if rows and cols:
        block_norms = local_row_norms(local, lora_A[:, c0:c0 + cols], lora_B[r0:r0 + rows], scaling)
        sums[r0:r0 + rows] = block_norms.square()
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(sums, group=mesh.get_group(mesh_dim))
    return sums.sqrt_()


def tensor_parallel_perturbed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     perturbed_local_linear: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``x (W + diag(c) Z)^T + bias`` for a ``DTensor`` weight, each rank on its own shard.

    ``weight`` is the logical ``(out, in)`` DTensor; per mesh dimension it is sharded by rows
    (``ColwiseParallel``: ``x`` replicated, output sharded on its last dimension), by columns
    (``RowwiseParallel``: ``x`` sharded on its last dimension, output a partial sum) or replicated.
    ``x`` (a DTensor, or a plain tensor taken as replicated) is redistributed to what the weight
    needs, as ``F.linear`` on DTensors would. ``perturbed_local_linear(x_local, w_local, noise_offset)``
    is the single-device op (the layer passes :func:`~flatlora_kernels.functional._flat_lora_linear`
    with its seed and its slice of ``c``); it sees the shard and the shard's offset, so every rank
    regenerates exactly its block of the global ``Z``. Returns a DTensor with the placements
    ``F.linear`` gives (the layer's tensor-parallel output hooks then redistribute it); the bias,
    a DTensor sharded like the output or replicated, is added by DTensor's own rules.
    """
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    local_weight, offset = local_block(weight)
    mesh = weight.device_mesh
    out_dim = x.dim() - 1
    # Per mesh dimension: the layout x needs, the layout of x's gradient (a rank that holds some rows
    # of W sees only their share of dX: a partial sum), and the output's layout.
    x_placements, x_grad_placements, out_placements = [], [], []
    for placement in weight.placements:
        if placement == Shard(0):
            x_placements.append(Replicate())
            x_grad_placements.append(Partial())
            out_placements.append(Shard(out_dim))
        elif placement == Shard(1):
            x_placements.append(Shard(out_dim))
            x_grad_placements.append(Shard(out_dim))
            out_placements.append(Partial())
        else:
            x_placements.append(Replicate())
            x_grad_placements.append(Replicate())
            out_placements.append(Replicate())
    if not isinstance(x, DTensor):
        x = DTensor.from_local(x, mesh, [Replicate()] * mesh.ndim, run_check=False)
    x = x.redistribute(mesh, x_placements)
    local_out = perturbed_local_linear(x.to_local(grad_placements=x_grad_placements), local_weight, offset)
    out = DTensor.from_local(local_out, mesh, out_placements, run_check=False)
    return out if bias is None else out + bias


def check_seed_shared_across_shards(seed: int, weight: torch.Tensor, layer: str) -> None:
    """Raise unless every rank holding a shard of ``weight`` uses the same noise ``seed`` (a collective).

    A tensor-parallel layer's shards are blocks of one perturbed matrix; with different seeds they
    would be blocks of different ones, silently. Called once per sample, not per forward.
    """
    from torch.distributed.tensor import Shard

    mine = torch.tensor([seed_to_int64(seed)], dtype=torch.int64, device=weight.to_local().device)
    for mesh_dim, placement in enumerate(weight.placements):
        if not isinstance(placement, Shard):
            continue
        group = weight.device_mesh.get_group(mesh_dim)
        seeds = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(seeds, mine, group=group)
        if any(int(other) != int(mine) for other in seeds):
            raise ValueError(f"{layer}: the ranks that hold shards of this tensor-parallel weight drew different "
                             "noise seeds, so their blocks would belong to different perturbations; a "
                             "tensor-parallel model needs one sample per layer: apply_flat_lora(..., "
                             "per_rank_noise=False)")


def is_zero3_partitioned(param: torch.Tensor) -> bool:
    """True for a parameter partitioned by DeepSpeed ZeRO-3 (it carries ``ds_tensor``, its flat local
    partition, and ``ds_shape``; outside a forward its ``data`` is an empty tensor)."""
    return getattr(param, "ds_tensor", None) is not None and hasattr(param, "ds_shape")


def _zero3_gathered(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Whole copies of small ZeRO-3 parameters (the LoRA factors), gathered on every rank (a collective)."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return [p.detach().clone() for p in params]


def zero3_merged_row_norms(weight: torch.Tensor, fan_in_fan_out: bool, lora_A: torch.Tensor, lora_B: torch.Tensor,
                           scaling: float, chunk: int = 1 << 20) -> torch.Tensor:
    """``||W_i + s·B_i A||_2`` for every row of a ZeRO-3 partitioned base weight, without gathering ``W``.

    Each rank holds a flat, padded slice ``[start, start + partition)`` of the stored matrix (row-major
    ``ds_shape``; GPT-2's ``Conv1D`` stores the logical matrix transposed). It adds the squares of its
    elements of ``W + s·BA`` into per-row sums by flat offset (``chunk`` elements at a time, so the
    temporaries stay bounded), and one all-reduce of ``m`` floats over the parameter's process group
    gives the norms on every rank. The LoRA factors (``r·(m + n)`` elements) are gathered whole.
    A collective: every rank must call it, in the same order. Returns a float32 ``(m,)`` tensor.
    """
    partition = weight.ds_tensor
    if getattr(partition, "final_location", None) is not None:  # DeepSpeed sets it for NVMe offload only
        raise NotImplementedError(f"ZeRO-3 weights offloaded to {partition.final_location} are not supported "
                                  "by the Flat-LoRA filter norms (device memory and CPU offload are)")
    if hasattr(partition, "ds_quant_scale"):
        raise NotImplementedError("ZeRO++ quantized frozen weights (zero_quantized_nontrainable_weights) are not "
                                  "supported by the Flat-LoRA filter norms")
    lora_A, lora_B = [t.float() for t in _zero3_gathered([lora_A, lora_B])]
    stored_rows, stored_cols = (int(d) for d in weight.ds_shape)
    m = stored_cols if fan_in_fan_out else stored_rows
    group = weight.ds_process_group
    numel = stored_rows * stored_cols
    start = partition.ds_numel * torch.distributed.get_rank(group=group)
    stop = min(start + partition.ds_numel, numel)  # the last rank's partition is padded
    device = partition.device
    lora_A, lora_B = lora_A.to(device), lora_B.to(device)
    sums = torch.zeros(m, dtype=torch.float32, device=device)
    for first in range(start, stop, chunk):
        flat = torch.arange(first, min(first + chunk, stop), device=device)
        stored_row, stored_col = flat // stored_cols, flat % stored_cols
        rows, cols = (stored_col, stored_row) if fan_in_fan_out else (stored_row, stored_col)
        merged = partition[first - start:first - start + flat.numel()].float()
        merged = merged + scaling * (lora_B[rows] * lora_A[:, cols].t()).sum(1)
        sums.index_add_(0, rows, merged.square())
    torch.distributed.all_reduce(sums, group=group)
    return sums.sqrt_()
