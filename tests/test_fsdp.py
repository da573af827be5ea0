"""Flat-LoRA on FSDP2 (``fully_shard``): two processes on gloo against one process without FSDP."""

import os

import pytest
import torch
import torch.distributed as dist

from flatlora_kernels import apply_flat_lora

from .helpers import (DP_LR, DP_SEED, DP_SIGMA, DP_STEPS, DP_WORLD, TRAINER_STEPS, assert_plain_peft_adapter_equals,
                      dp_batch, join_process_group, leave_process_group, one_process_reference, peft_family,
                      run_processes, trainable, train_with_trainer)

fsdp = pytest.importorskip("torch.distributed.fsdp")

DEADLINE_S = 240


def _worker(rank, init_file, per_rank_noise, reshard, apply_first, granularity, out_dir):
    join_process_group(rank, DP_WORLD, init_file)
    from peft.tuners.lora import LoraLayer
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model, _ = peft_family("llama")  # identical initial weights on every rank
    config = dict(sigma=DP_SIGMA, schedule="constant", seed=DP_SEED, per_rank_noise=per_rank_noise)
    ctl = apply_flat_lora(model, **config) if apply_first else None
    if granularity == "block":
        units = list(model.base_model.model.model.layers)
    else:  # each LoRA layer itself: its class becomes FSDP2's FSDP<Cls> subclass
        units = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for unit in units:
        fsdp.fully_shard(unit, reshard_after_forward=reshard)
    fsdp.fully_shard(model, reshard_after_forward=reshard)
    # applied to the sharded model, the first sample's filter norms come from DTensor shards (and
    # applied first, every later sample's do)
    ctl = ctl or apply_flat_lora(model, **config)
    opt = torch.optim.SGD(trainable(model).values(), lr=DP_LR)
    losses, grads = [], None
    for step in range(DP_STEPS):
        ids = dp_batch(rank, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.item())
        if step == 0:
            grads = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
        opt.step()
        opt.zero_grad()
        ctl.step()
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=full)
    torch.save({"losses": losses, "grads": grads, "row_std": [c.clone() for c in
                (layer.noise_row_std for layer in ctl.layers.values())],
                "classes": {type(layer).__name__ for layer in ctl.layers.values()}},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    leave_process_group()


@pytest.mark.parametrize("per_rank_noise,reshard,apply_first,granularity", [
    (True, True, False, "block"), (False, False, True, "block"),
    (True, True, False, "lora_layer"), (False, True, True, "lora_layer"),
])
def test_fsdp2_two_processes_equal_one_process_without_fsdp(tmp_path, per_rank_noise, reshard, apply_first,
                                                            granularity):
    run_processes(_worker, (str(tmp_path / "init"), per_rank_noise, reshard, apply_first, granularity,
                            str(tmp_path)), DP_WORLD, DEADLINE_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(DP_WORLD)]
    # sharded per LoRA layer, the adopted layers are FSDP2's subclasses of FlatLoraLinear
    expected_class = "FlatLoraLinear" if granularity == "block" else "FSDPFlatLoraLinear"
    assert all(result["classes"] == {expected_class} for result in results)
    losses, grads, row_std, adapters = one_process_reference(per_rank_noise)
    for rank, result in enumerate(results):
        assert result["losses"] == pytest.approx(losses[rank], rel=1e-5), f"rank {rank} losses"
        # the filter norms reduced from shards equal those of the whole weights
        for got, want in zip(result["row_std"], row_std):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    if per_rank_noise:  # the noise differs across ranks, so the losses on equal data would too
        assert results[0]["losses"] != results[1]["losses"]

    # the checkpoint is a plain PEFT adapter: plain PEFT loads it onto a fresh base model
    assert_plain_peft_adapter_equals(tmp_path / "adapter", adapters)


# ---------------------------------------------------------------------- through Trainer/accelerate
def _accelerate_fsdp_on_cpu() -> None:
    """accelerate 1.15 turns an FSDP request into plain DDP when the processes run on CPUs (its list of
    FSDP-capable distributed types has no MULTI_CPU). Flip the type back after its own set-up (in the
    process-wide state too, which every later ``AcceleratorState()`` copies), so the rest (accelerate's
    FSDP2 ``prepare``, which calls ``fully_shard``, its gradient clipping and full-state-dict saving, and
    the Trainer loop) runs unchanged on gloo. Test-only: on GPUs accelerate does this itself."""
    import accelerate.state
    from accelerate.utils import DistributedType

    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    accelerate.state.AcceleratorState.__init__ = init


FSDP2_ARGS = dict(fsdp=True, fsdp_config={"fsdp_version": 2, "reshard_after_forward": True,
                                         "state_dict_type": "FULL_STATE_DICT",
                                         "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})


def _trainer_worker(rank, init_file, out_dir):
    join_process_group(rank, DP_WORLD, init_file)
    # accelerate checks the launcher's environment; the process group above already exists, so the
    # address is never dialled (loopback only in any case)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(DP_WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")
    _accelerate_fsdp_on_cpu()
    trainer, callback = train_with_trainer(out_dir, distributed=FSDP2_ARGS)
    assert trainer.accelerator.is_fsdp2, "the run must have been accelerate's FSDP2 path throughout"
    sharded = [type(p).__name__ for p in trainer.model.parameters()]
    trainer.save_model(os.path.join(out_dir, "adapter"))
    torch.save({"sharded": sharded, "steps": callback.controller.step_count,
                "wrapped": type(trainer.model_wrapped).__name__}, os.path.join(out_dir, f"trainer{rank}.pt"))
    dist.barrier()
    leave_process_group()


def test_fsdp2_through_trainer_and_accelerate_equals_one_process(tmp_path):
    run_processes(_trainer_worker, (str(tmp_path / "init"), str(tmp_path)), DP_WORLD, DEADLINE_S)
    for rank in range(DP_WORLD):
        got = torch.load(tmp_path / f"trainer{rank}.pt")
        assert set(got["sharded"]) == {"DTensor"}, "accelerate must have sharded every parameter with fully_shard"
        assert got["steps"] == TRAINER_STEPS
    reference, _ = train_with_trainer(tmp_path / "single", distributed=None)
    adapters = {n: p.detach() for n, p in reference.model.named_parameters() if p.requires_grad}
    # the Trainer saved a plain PEFT adapter, gathered from the shards
    assert_plain_peft_adapter_equals(tmp_path / "adapter", adapters)
    untrained = trainable(peft_family("llama")[0])
    assert any(not torch.allclose(adapters[n], untrained[n]) for n in adapters), "training must move the adapters"
