"""A real two-process DDP run (gloo on the CPU; NCCL when CUDA is present)."""

import os

import pytest
import torch

from flatlora_kernels import apply_flat_lora

from .helpers import VOCAB, join_process_group, leave_process_group, peft_family, run_processes

WORLD = 2
STEPS = 3
DEADLINE_S = 240  # the whole run; a hung collective fails the test instead of stalling the suite


def _worker(rank, init_file, per_rank_noise, out_dir):
    use_cuda = torch.cuda.device_count() >= WORLD
    join_process_group(rank, WORLD, init_file, backend="nccl" if use_cuda else "gloo")
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    model, _ = peft_family("llama")  # identical initial weights on every rank
    model.to(device)
    ctl = apply_flat_lora(model, sigma=0.2, schedule="constant", seed=3, per_rank_noise=per_rank_noise)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if use_cuda else None)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batch
    seeds = []
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 9), generator=data).to(device)
        ddp(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        seeds.append([layer.noise_seed for layer in ctl.layers.values()])
        ctl.step()
    adapters = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.save({"seeds": seeds, "adapters": adapters}, os.path.join(out_dir, f"rank{rank}.pt"))
    del ddp  # before the group goes (see leave_process_group)
    leave_process_group()


@pytest.mark.parametrize("per_rank_noise", [True, False])
def test_ddp_two_processes(tmp_path, per_rank_noise):
    run_processes(_worker, (str(tmp_path / "init"), per_rank_noise, str(tmp_path)), WORLD, DEADLINE_S)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    a, b = (r["adapters"] for r in results)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "adapters differ across ranks"
    for step in range(STEPS):
        same = [x == y for x, y in zip(results[0]["seeds"][step], results[1]["seeds"][step])]
        assert all(same) if not per_rank_noise else not any(same)
