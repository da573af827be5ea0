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

``W`` itself is never gathered. The noise needs no such care: it is a function of the global
``(i, j)`` only, and FSDP2 runs the forward on the unsharded weight. This is a collective: every
rank of the mesh must call it, in the same order (the :class:`~flatlora_kernels.FlatLora`
controller resamples its layers in one fixed order on every rank).
"""

from __future__ import annotations

from typing import Callable

import torch


def is_dtensor(tensor: torch.Tensor) -> bool:
    """True for a ``torch.distributed`` ``DTensor`` (False where torch has no distributed support)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if is_dtensor(tensor) else tensor


def sharded_merged_row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                             local_row_norms: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``||W_i + s·B_i A||_2`` for every row of a ``DTensor`` weight (see the module docstring).

    ``weight`` is the logical ``(out, in)`` DTensor (a transposed view of a ``Conv1D`` weight is
    fine: its shard is then a block of columns); ``lora_A``/``lora_B`` may be DTensors or plain
    tensors. ``local_row_norms(weight, lora_A, lora_B, scaling)`` is the backend's single-device
    norms op. Returns a plain float32 ``(m,)`` tensor, replicated on every rank.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = weight.device_mesh, weight.placements
    for placement in placements:
        if not isinstance(placement, (Shard, Replicate)):
            raise NotImplementedError(f"filter norms of a weight with placement {placement} (only Shard and "
                                      "Replicate placements are supported)")
    (rows, cols), (r0, c0) = compute_local_shape_and_global_offset(weight.shape, mesh, placements)
    lora_A, lora_B = _whole(lora_A), _whole(lora_B)
    local = weight.to_local()
    sums = torch.zeros(weight.shape[0], dtype=torch.float32, device=local.device)
    if rows and cols:
        block_norms = local_row_norms(local, lora_A[:, c0:c0 + cols], lora_B[r0:r0 + rows], scaling)
        sums[r0:r0 + rows] = block_norms.square()
    for mesh_dim, placement in enumerate(placements):
        if isinstance(placement, Shard):
            torch.distributed.all_reduce(sums, group=mesh.get_group(mesh_dim))
    return sums.sqrt_()
