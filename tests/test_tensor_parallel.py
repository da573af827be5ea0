"""Flat-LoRA on tensor-parallel base layers: two processes on gloo against one unsharded process.

One small PEFT model holds the four plans plain PEFT accepts over ``parallelize_module``:

* ``fc1``/``fc2``: the Megatron pair, ``ColwiseParallel`` base (local output shards) with a column-wise
  ``lora_B``, then ``RowwiseParallel`` base with a row-wise ``lora_A``;
* ``fc3``: ``ColwiseParallel(output_layouts=Replicate())`` base, LoRA factors replicated;
* ``fc4``: ``RowwiseParallel(input_layouts=Replicate())`` base, LoRA factors replicated.

Sizes are odd so that shards start at rows and columns that are not multiples of 4 (the Triton
path that makes one Philox call per element) and row blocks are uneven.
"""

import os

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model

from flatlora_kernels import apply_flat_lora

from .helpers import REL_TOL, TinyMLP, join_process_group, leave_process_group, rel_err, run_processes

tp = pytest.importorskip("torch.distributed.tensor.parallel")

WORLD = 2
SIGMA, SEED = 0.5, 17
DEADLINE_S = 240
LAYERS = ("fc1", "fc2", "fc3", "fc4")


def _peft_mlp():
    torch.manual_seed(0)
    # init_lora_weights=False: B is random, so every LoRA gradient and the merged norms are non-trivial
    return get_peft_model(TinyMLP(14, 18, 14, 22, 10),
                          LoraConfig(r=3, lora_alpha=6, target_modules=list(LAYERS), init_lora_weights=False))


def _inputs():
    torch.manual_seed(1)
    return torch.randn(2, 5, 14), torch.randn(2, 5, 10)


def _plan() -> dict:
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    root = "base_model.model."
    return {root + "fc1.base_layer": ColwiseParallel(), root + "fc1.lora_B.default": ColwiseParallel(),
            root + "fc2.base_layer": RowwiseParallel(), root + "fc2.lora_A.default": RowwiseParallel(),
            root + "fc3.base_layer": ColwiseParallel(output_layouts=Replicate()),
            root + "fc4.base_layer": RowwiseParallel(input_layouts=Replicate())}


def _run(model, ctl):
    x, dy = _inputs()
    y = model(x)
    y.backward(dy)
    grads = {name: p.grad for name, p in model.named_parameters() if p.requires_grad}
    row_std = {name: layer.noise_row_std for name, layer in ctl.layers.items()}
    return y, grads, row_std


def _whole(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worker(rank, init_file, backend, out_dir):
    os.environ["FLATLORA_BACKEND"] = backend
    join_process_group(rank, WORLD, init_file)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD,))
    model = _peft_mlp()
    tp.parallelize_module(model, mesh, _plan())
    ctl = apply_flat_lora(model, sigma=SIGMA, schedule="constant", seed=SEED, per_rank_noise=False)
    y, grads, row_std = _run(model, ctl)
    torch.save({"y": _whole(y).detach(), "grads": {n: _whole(g) for n, g in grads.items()}, "row_std": row_std,
                "weights_sharded": [type(model.get_submodule(f"base_model.model.{n}.base_layer").weight).__name__
                                    for n in LAYERS]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    # per-rank seeds (per_rank_noise=True) would make the shards blocks of different perturbations:
    # refused, not silently mixed
    for layer in ctl.layers.values():
        layer.sample_noise(SEED + rank, SIGMA)
    errors = {}
    try:
        model(_inputs()[0])
    except ValueError as exc:
        errors["per-rank seeds"] = str(exc)
    # A plan plain PEFT cannot run either (column-sharded base output, replicated LoRA output): both fail,
    # ours with a message that says what to change.
    bad = _peft_mlp()
    tp.parallelize_module(bad, mesh, {"base_model.model.fc1.base_layer": tp.ColwiseParallel()})
    for name in ("plain PEFT", "Flat-LoRA"):
        if name == "Flat-LoRA":
            apply_flat_lora(bad, sigma=SIGMA, schedule="constant", seed=SEED, per_rank_noise=False)
        try:
            bad(_inputs()[0])
        except RuntimeError as exc:
            errors[name] = str(exc)
    torch.save(errors, os.path.join(out_dir, f"errors{rank}.pt"))
    dist.barrier()
    leave_process_group()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_tensor_parallel_layers_equal_the_unsharded_model(tmp_path, backend, monkeypatch):
    monkeypatch.setenv("FLATLORA_BACKEND", backend)
    run_processes(_worker, (str(tmp_path / "init"), backend, str(tmp_path)), WORLD, DEADLINE_S)
    model = _peft_mlp()
    ctl = apply_flat_lora(model, sigma=SIGMA, schedule="constant", seed=SEED, per_rank_noise=False)
    y, grads, row_std = _run(model, ctl)
    with torch.no_grad():
        ctl.clear()
        plain = model(_inputs()[0])
    assert rel_err(y, plain) > 100 * REL_TOL[torch.float32], "the noise must change the output"
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["weights_sharded"] == ["DTensor"] * 4
        # the filter norms of row- and column-sharded weights, reduced across the mesh
        for name in row_std:
            torch.testing.assert_close(got["row_std"][name], row_std[name], rtol=1e-5, atol=0)
        assert rel_err(got["y"], y) <= REL_TOL[torch.float32], f"rank {rank}: perturbed forward"
        assert got["grads"].keys() == grads.keys()
        for name, g in grads.items():
            assert rel_err(got["grads"][name], g) <= REL_TOL[torch.float32], f"rank {rank}: gradient of {name}"
        errors = torch.load(tmp_path / f"errors{rank}.pt")
        assert "per_rank_noise=False" in errors["per-rank seeds"]
        assert "plain PEFT" in errors and "Tensor parallelism" in errors["Flat-LoRA"]
