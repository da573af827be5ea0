"""Flat-LoRA under DeepSpeed ZeRO-3: two processes on gloo (DeepSpeed's CPU accelerator) against one
process without DeepSpeed. ``stage3_param_persistence_threshold: 0`` partitions every weight, so the
filter norms really come from ZeRO-3's flat slices (small weights would otherwise stay whole)."""

import os

import pytest
import torch
import torch.distributed as dist

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported: gloo, no accelerator needed
deepspeed = pytest.importorskip("deepspeed")

from flatlora_kernels import apply_flat_lora  # noqa: E402

from .helpers import (  # noqa: E402
    DP_LR, DP_SEED, DP_SIGMA, DP_STEPS, DP_WORLD, TRAINER_STEPS, assert_plain_peft_adapter_equals, dp_batch,
    join_process_group, leave_process_group, one_process_reference, peft_family, run_processes, train_with_trainer)

DEADLINE_S = 240
ZERO3 = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
         "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}


def _worker(rank, init_file, apply_first, out_dir):
    join_process_group(rank, DP_WORLD, init_file)
    # deepspeed.initialize reads the launcher's variables; the process group above already exists
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(DP_WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")
    from deepspeed.utils import safe_get_full_grad

    model, _ = peft_family("llama")  # identical initial weights on every rank
    config = dict(sigma=DP_SIGMA, schedule="constant", seed=DP_SEED, per_rank_noise=False)
    ctl = apply_flat_lora(model, **config) if apply_first else None
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    engine, *_ = deepspeed.initialize(model=model, config=ZERO3,
                                      optimizer=torch.optim.SGD(list(trainable.values()), lr=DP_LR))
    base = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    assert base.numel() == 0 and base.ds_tensor.numel() > 0, "the base weight must be partitioned"
    # applied after initialize, the first sample's norms come from the partitions (applied first, every later one's)
    ctl = ctl or apply_flat_lora(model, **config)
    losses, grads = [], None
    for step in range(DP_STEPS):
        ids = dp_batch(rank, step)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        losses.append(loss.item())
        if step == 0:
            grads = {n: safe_get_full_grad(p).clone() for n, p in trainable.items()}
        engine.step()
        ctl.step()
    with deepspeed.zero.GatheredParameters(list(trainable.values()), modifier_rank=None):
        adapters = {n: p.detach().clone() for n, p in trainable.items()}
    if rank == 0:
        model.save_pretrained(os.path.join(out_dir, "adapter"), state_dict=adapters)
    torch.save({"losses": losses, "grads": grads, "row_std": [layer.noise_row_std.clone() for layer in
                                                              ctl.layers.values()]},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    leave_process_group()


@pytest.mark.parametrize("apply_first", [False, True], ids=["applied-after-initialize", "applied-before"])
def test_zero3_two_processes_equal_one_process_without_deepspeed(tmp_path, apply_first):
    run_processes(_worker, (str(tmp_path / "init"), apply_first, str(tmp_path)), DP_WORLD, DEADLINE_S)
    losses, grads, row_std, adapters = one_process_reference(per_rank_noise=False)
    for rank in range(DP_WORLD):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["losses"] == pytest.approx(losses[rank], rel=1e-5), f"rank {rank} losses"
        for got, want in zip(result["row_std"], row_std, strict=True):  # norms reduced from flat partitions
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for name, grad in result["grads"].items():
            torch.testing.assert_close(grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert_plain_peft_adapter_equals(tmp_path / "adapter", adapters)


def _trainer_worker(rank, init_file, out_dir):
    join_process_group(rank, DP_WORLD, init_file)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(DP_WORLD), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="29500")
    zero3 = {**ZERO3, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    trainer, callback = train_with_trainer(out_dir, distributed={"deepspeed": zero3})
    assert type(trainer.model_wrapped).__name__ == "DeepSpeedEngine"
    trainer.save_model(os.path.join(out_dir, "adapter"))
    torch.save({"steps": callback.controller.step_count}, os.path.join(out_dir, f"trainer{rank}.pt"))
    dist.barrier()
    leave_process_group()


def test_zero3_through_trainer_equals_one_process(tmp_path):
    """``TrainingArguments(deepspeed=...)`` with ``FlatLoraCallback``: the saved adapter is a plain PEFT one and
    equals a one-process Trainer run over the same batches."""
    run_processes(_trainer_worker, (str(tmp_path / "init"), str(tmp_path)), DP_WORLD, DEADLINE_S)
    assert [torch.load(tmp_path / f"trainer{r}.pt")["steps"] for r in range(DP_WORLD)] == [TRAINER_STEPS] * DP_WORLD
    reference, _ = train_with_trainer(tmp_path / "single", distributed=None)
    adapters = {n: p.detach() for n, p in reference.model.named_parameters() if p.requires_grad}
    assert_plain_peft_adapter_equals(tmp_path / "adapter", adapters)
