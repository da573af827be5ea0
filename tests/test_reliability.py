"""Fail fast and say why: non-finite values for every method and policy, resume that checks what it resumes,
crashes (SIGKILL) at random moments, and the errors a new user meets first."""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

import flatlora_kernels as fk
from flatlora_kernels import noise

from . import reliability_worker
from .helpers import batches, loss_on, tiny_peft, trainable

def equal(a, b) -> bool:
    """Bitwise equality of nested states (dicts, lists, tensors, numbers)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b))
    return a == b


def poisoned(batch):
    x, y = batch
    x = x.clone()
    x[0, 0] = math.inf
    return x, y


# ------------------------------------------------------------------ one step of every method
# Each runner builds (model, optimizer, method) and `step(poison)` takes one optimizer step of a window of two
# micro-batches; `poison` is None, "input" (an inf in every pass of the window) or "last" (only the last
# pass: for the SAM family the perturbed pass, for the others the last micro-batch).

class Runner:
    def __init__(self, kind: str, policy: str):
        self.kind = kind
        self.model = tiny_peft(torch.float32)
        self.params = trainable(self.model)
        if kind == "sam":
            self.opt = fk.SAM(self.params.values(), torch.optim.AdamW, rho=0.05, lr=1e-2, on_nonfinite=policy)
            self.method = None
        else:
            self.opt = torch.optim.AdamW(self.params.values(), lr=1e-2)
            self.method = {
                "flat_lora": lambda: fk.apply_flat_lora(self.model, sigma=0.2, schedule="constant", resample_every=2,
                                                        on_nonfinite=policy),
                "sam_perturber": lambda: fk.SAMPerturber(self.params.values(), rho=0.05, on_nonfinite=policy),
                "merged_sam": lambda: fk.MergedSAM(self.model, rho=0.05, on_nonfinite=policy),
                "rwp_merged": lambda: fk.RWP(self.model, sigma=0.2, scope="merged", on_nonfinite=policy),
                "rwp_lora": lambda: fk.RWP(self.model, sigma=0.2, scope="lora", on_nonfinite=policy),
                "bilora": lambda: fk.BiLoRA(self.model, rho=0.05, on_nonfinite=policy),
            }[kind]()
        if kind == "flat_lora":
            self.method.guard(self.opt)
        self.steps = 0

    def step(self, poison: str | None = None) -> None:
        data = batches(2, dtype=torch.float32, seed=self.steps)
        calls = []

        def closure_for(batch, last_call_poisoned):
            def closure():
                calls.append(None)
                bad = poison == "input" or (poison == "last" and last_call_poisoned(len(calls)))
                return loss_on(self.model, poisoned(batch) if bad else batch)
            return closure

        self.steps += 1
        if self.kind == "flat_lora":
            for micro, batch in enumerate(data):
                closure_for(batch, lambda n: n == 2)().div(2).backward()
            self.opt.step()
            self.opt.zero_grad()
            self.method.step()
        elif self.kind == "sam":
            loss_on(self.model, poisoned(data[0]) if poison == "input" else data[0]).backward()
            self.opt.step(lambda: closure_for(data[0], lambda n: True)().backward())
            self.opt.zero_grad()
        else:
            sam_family = self.kind in ("sam_perturber", "merged_sam")
            for micro, batch in enumerate(data):
                # the SAM family's last micro-batch makes two calls; its second is the perturbed pass
                self.method.accumulate(closure_for(batch, lambda n: n == 3 if sam_family else n == 2),
                                       last=micro == 1, window=2)
            self.opt.step()
            self.opt.zero_grad()
            self.method.step()

    def state(self) -> dict:
        """Everything a skipped step must leave as it was: weights, optimizer state, the method's state."""
        method_state = {}
        if isinstance(self.method, fk.FlatLora):
            method_state = self.method.state_dict()
        elif self.method is not None:
            method_state = self.method.state_dict()
        return copy.deepcopy({"weights": {n: p.detach() for n, p in self.model.named_parameters()},
                              "optimizer": self.opt.state_dict(), "method": method_state})


KINDS = ["flat_lora", "sam", "sam_perturber", "merged_sam", "rwp_merged", "rwp_lora", "bilora"]


@pytest.mark.parametrize("poison", ["input", "last"])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_raise_names_the_step_and_cause_before_anything_is_written(kind, poison):
    runner = Runner(kind, "raise")
    runner.step()
    before = runner.state()["weights"]
    with pytest.raises(FloatingPointError, match=r"(?s)(step 2|non-finite).*input"):
        runner.step(poison)
    after = {n: p.detach() for n, p in runner.model.named_parameters()}
    assert equal(before, after), "the optimizer wrote a non-finite step"


@pytest.mark.parametrize("poison", ["input", "last"])
@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_skip_changes_nothing_bitwise(kind, poison):
    runner = Runner(kind, "skip")
    runner.step()
    before = runner.state()
    with pytest.warns(RuntimeWarning, match="skipped"):
        runner.step(poison)
    assert equal(before, runner.state()), "a skipped step changed the weights, the optimizer or the sample"
    runner.step()  # training goes on, finite
    assert not equal(before["weights"], runner.state()["weights"])
    assert all(bool(torch.isfinite(p).all()) for p in runner.params.values())


def test_flat_lora_error_names_the_layer():
    runner = Runner("flat_lora", "raise")
    with pytest.raises(FloatingPointError, match=r"gradient of base_model\.model\.fc\d\.lora_[AB]\.default "
                                                 r"holds NaN/inf at optimizer step 1"):
        runner.step("input")


def test_late_sample_error_names_the_layer_and_cause():
    model = tiny_peft(torch.float32)
    ctl = fk.apply_flat_lora(model, sigma=0.1, schedule="constant")
    with torch.no_grad():
        model.base_model.model.fc2.lora_B.default.weight[0, 0] = math.nan
    with pytest.raises(FloatingPointError, match=r"layer base_model\.model\.fc2.*step 1.*learning rate"):
        ctl.step()
    with pytest.raises(FloatingPointError, match=r"layer base_model\.model\.fc1.*step 0.*overflows float32.*sigma"):
        fk.apply_flat_lora(tiny_peft(torch.float32), sigma=1e39, schedule="constant")


@pytest.mark.parametrize("policy", ["raise", "skip"])
def test_grad_scaler_skipping_every_step_is_reported(policy):
    model = tiny_peft(torch.float32)
    ctl = fk.apply_flat_lora(model, sigma=0.1, schedule="constant", on_nonfinite=policy)
    ctl.max_skipped_steps = 3
    opt = torch.optim.SGD(trainable(model).values(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    ctl.guard(opt)

    def scaled_step(batch):
        scaler.scale(loss_on(model, batch)).backward()
        scaler.step(opt)  # skipped by the scaler on inf: the guard's check never runs then
        scaler.update()
        opt.zero_grad()
        ctl.step()

    scaled_step(batches(1, dtype=torch.float32)[0])
    assert ctl.skipped_in_a_row == 0
    bad = poisoned(batches(1, dtype=torch.float32)[0])
    scaled_step(bad)
    scaled_step(bad)
    assert ctl.skipped_in_a_row == 2
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="last 3 optimizer steps.*GradScaler"):
            scaled_step(bad)
    else:
        with pytest.warns(RuntimeWarning, match="last 3 optimizer steps"):
            scaled_step(bad)


# ------------------------------------------------------------------ resume
def _plain_run(steps, state=None, restore_sample_first=True, **config):
    """Flat-LoRA with resample_every=3 for ``steps`` steps (from ``state`` if given); returns the model,
    optimizer and controller."""
    model = tiny_peft(torch.float32)
    params = trainable(model)
    ctl = fk.apply_flat_lora(model, **{"sigma": 0.2, "total_steps": 12, "resample_every": 3, "seed": 3, **config})
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    start = 0
    if state is not None:
        if restore_sample_first:
            ctl.load_state_dict(state["ctl"])
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["adapters"][n])
        opt.load_state_dict(state["opt"])
        if not restore_sample_first:
            ctl.load_state_dict(state["ctl"])
        start = state["ctl"]["step"]
    for step in range(start, steps):
        loss_on(model, batches(1, dtype=torch.float32, seed=step)[0]).backward()
        opt.step()
        opt.zero_grad()
        ctl.step()
    return model, opt, ctl


@pytest.mark.parametrize("restore_sample_first", [True, False])
def test_resume_restores_the_exact_sample_in_any_order(restore_sample_first):
    straight = trainable(_plain_run(12)[0])
    model, opt, ctl = _plain_run(4)  # mid-sample: the sample in use was drawn after step 3
    state = copy.deepcopy({"ctl": ctl.state_dict(), "opt": opt.state_dict(),
                           "adapters": {n: p.detach() for n, p in trainable(model).items()}})
    assert state["ctl"]["noise_contract"] == noise.CONTRACT_VERSION
    assert all(entry["row_std"].shape == (layer.out_features,) for entry, layer in
               zip(state["ctl"]["sample"].values(), ctl.layers.values()))
    resumed = trainable(_plain_run(12, state, restore_sample_first)[0])
    assert equal({n: p.detach() for n, p in straight.items()}, {n: p.detach() for n, p in resumed.items()})


@pytest.mark.parametrize("key, value", [("seed", 4), ("sigma", 0.3), ("schedule", "linear"), ("resample_every", 2),
                                        ("noise_contract", noise.CONTRACT_VERSION + 1)])
def test_resume_mismatch_names_both_values(key, value):
    _, _, ctl = _plain_run(2)
    state = ctl.state_dict()
    saved = {**state, key: value}
    with pytest.raises(ValueError, match=rf"{key}={value!r} saved, {state[key]!r} now.*allow_config_change"):
        ctl.load_state_dict(saved)
    with pytest.warns(UserWarning, match=f"changed settings {key}.*drawn anew"):
        ctl.load_state_dict(saved, allow_config_change=True)
    assert ctl.step_count == 2


def test_resume_rejects_malformed_states():
    _, _, ctl = _plain_run(3)
    with pytest.raises(TypeError, match="expects the dict from FlatLora.state_dict.*NoneType"):
        ctl.load_state_dict(None)
    with pytest.raises(ValueError, match="no 'step' entry"):
        ctl.load_state_dict({})
    with pytest.raises(ValueError, match="saved for the layers"):
        ctl.load_state_dict({**ctl.state_dict(), "layers": ["other"]})
    state = ctl.state_dict()
    name = next(iter(state["sample"]))
    state["sample"][name]["row_std"] = state["sample"][name]["row_std"][:-1]
    with pytest.raises(ValueError, match=f"sample for {name}: row_std must be a float32 tensor of shape"):
        ctl.load_state_dict(state)


def test_sigkill_at_random_moments_then_resume_is_bitwise(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        straight = reliability_worker.train(str(tmp_path / "straight.pt"))
    finally:
        torch.set_num_threads(threads)
    checkpoint, result = str(tmp_path / "run.pt"), str(tmp_path / "result.pt")
    fork = multiprocessing.get_context("fork")  # the worker starts at once, with everything imported
    rng = random.Random()
    run_s = reliability_worker.STEPS * reliability_worker.PAUSE_S
    steps_at_kill = []
    for _ in range(3):  # SIGKILL at a random moment after a checkpoint, three times, then run to the end
        worker = fork.Process(target=reliability_worker.run, args=(checkpoint, result))
        worker.start()
        deadline = time.monotonic() + 60
        while not os.path.exists(checkpoint) and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, run_s / 4))
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        steps_at_kill.append(torch.load(checkpoint, weights_only=False)["step"])
    assert 0 < steps_at_kill[-1] < reliability_worker.STEPS and not os.path.exists(result), steps_at_kill
    worker = fork.Process(target=reliability_worker.run, args=(checkpoint, result))
    worker.start()
    worker.join(timeout=120)
    assert worker.exitcode == 0
    assert equal(straight, torch.load(result, weights_only=False))


# ------------------------------------------------------------------ the errors a new user meets first
def _zero_input_model():
    from peft import LoraConfig, get_peft_model

    class Empty(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(0, 4)

    with pytest.warns(UserWarning):
        return get_peft_model(Empty(), LoraConfig(r=2, target_modules=["fc"]))


@pytest.mark.parametrize("call, error, match", [
    (lambda: fk.apply_flat_lora(None, sigma=0.1), TypeError, "apply_flat_lora expects a PEFT model.*NoneType"),
    (lambda: fk.SAM([torch.nn.Parameter(torch.ones(2))], "adamw"), TypeError,
     "base_optimizer_cls must be a torch.optim.Optimizer class.*'adamw'"),
    (lambda: fk.FlatLoraCallback("x"), TypeError, "config must be a FlatLoraConfig, got str"),
    (lambda: fk.apply_flat_lora(_zero_input_model(), sigma=0.1), ValueError,
     "base_model.model.fc has in_features=0.*both >= 1"),
    (lambda: fk.flat_lora_linear(torch.ones(3, 0), torch.ones(4, 0), None, torch.ones(2, 0), torch.ones(4, 2), 1.0,
                                 seed=1, row_std=torch.ones(4)), ValueError, r"weight has shape \(4, 0\).*in_features"),
    (lambda: fk.apply_flat_lora(tiny_peft(torch.float32), sigma=0.1, schedule=lambda step, total: 1e300), ValueError,
     r"schedule callable \(schedule=\) returned 1e\+300 at step 0.*\[0, 1000\]"),
    (lambda: fk.RWP(tiny_peft(torch.float32), on_nonfinite="ignore"), ValueError, "on_nonfinite must be one of"),
    (lambda: fk.BiLoRA(tiny_peft(torch.float32), on_nonfinite=None), ValueError, "on_nonfinite must be one of"),
    (lambda: fk.apply_flat_lora(tiny_peft(torch.float32), sigma=0.1, schedule="constant").guard("adamw"), TypeError,
     "guard expects a torch.optim.Optimizer, got str"),
])
def test_unclear_errors_are_now_clear(call, error, match):
    with pytest.raises(error, match=match):
        call()
