"""The sharpness-aware methods under two-process DDP (gloo on loopback): the same adapters on both ranks,
SAM's perturbation from the all-reduced gradient (the same on both ranks), RWP's noise per rank."""

import contextlib
import os

import torch

import flatlora_kernels as fk

from .helpers import VOCAB, join_process_group, leave_process_group, peft_family, run_processes, trainable

WORLD = 2
STEPS = 2
WINDOW = 2
DEADLINE_S = 240
METHODS = ("sam", "merged_sam", "rwp_merged", "rwp_lora", "bilora")


def _method(name, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return {"sam": lambda: fk.SAMPerturber(params, rho=0.05),
            "merged_sam": lambda: fk.MergedSAM(model, rho=0.05),
            "rwp_merged": lambda: fk.RWP(model, sigma=0.2, scope="merged", seed=3),
            "rwp_lora": lambda: fk.RWP(model, sigma=0.2, scope="lora", seed=3),
            "bilora": lambda: fk.BiLoRA(model, rho=0.05, ascent_lr=1.0)}[name]()


def _train(name, rank):
    model, _ = peft_family("llama")  # identical initial weights on every rank
    method = _method(name, model)
    observed = []  # what each rank's perturbation was
    if name == "sam":
        first = method.params[0]
        original_perturb = method.perturb
        method.perturb = lambda: (original_perturb(), observed.append(first.detach().clone()))[0]
    if name == "merged_sam":
        original_factors = method._factors
        method._factors = lambda: (lambda f: (observed.append({k: dy.t() @ x for k, (x, dy) in f.items()}), f)[1])(
            original_factors())
    if name == "rwp_lora":
        observed.append(method.factor_noise()[0])
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    for _ in range(STEPS):
        for k in range(WINDOW):
            ids = torch.randint(0, VOCAB, (2, 9), generator=data)
            last = k == WINDOW - 1
            with ddp.no_sync() if not last else contextlib.nullcontext():
                method.accumulate(lambda: ddp(input_ids=ids, labels=ids).loss, last=last, window=WINDOW)
        opt.step()
        opt.zero_grad()
        method.step()
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return {"adapters": adapters, "observed": observed}


def _worker(rank, init_file, out_dir):
    join_process_group(rank, WORLD, init_file)
    results = {name: _train(name, rank) for name in METHODS}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    leave_process_group()


def test_sharpness_methods_ddp_two_processes(tmp_path):
    run_processes(_worker, (str(tmp_path / "init"), str(tmp_path)), WORLD, DEADLINE_S)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    plain, _ = peft_family("llama")
    for name in METHODS:
        a, b = (r[name]["adapters"] for r in ranks)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}: adapters differ"
        start = trainable(plain)
        assert any(not torch.equal(a[k], start[k]) for k in a), f"{name}: nothing trained"
    sam0, sam1 = (r["sam"]["observed"] for r in ranks)
    assert len(sam0) == STEPS and all(torch.equal(x, y) for x, y in zip(sam0, sam1)), "SAM's e differs by rank"
    msam0, msam1 = (r["merged_sam"]["observed"] for r in ranks)
    assert len(msam0) == STEPS
    for x, y in zip(msam0, msam1):
        assert all(torch.allclose(x[k], y[k], rtol=1e-6, atol=1e-9) for k in x), "merged e_W differs by rank"
    noise0, noise1 = (r["rwp_lora"]["observed"][0] for r in ranks)
    assert not torch.equal(noise0, noise1), "RWP noise should be per rank"
