"""FlatLoraCallback with transformers.Trainer: gradient accumulation, the schedule, resume."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from flatlora_kernels import FlatLoraCallback

from .helpers import TokenData, peft_family


class StopAfter(TrainerCallback):
    """Interrupt a run after a given optimizer step (its checkpoint is saved first)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def train(output_dir, max_steps, resume=None, sigma=0.1, callback=True, stop_after=None):
    model, _ = peft_family("llama")
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-3, save_steps=3, save_strategy="steps",
                             logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    callbacks = [FlatLoraCallback(sigma=sigma, seed=7)] if callback else []
    stop = [StopAfter(stop_after)] if stop_after else []
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks + stop)
    trainer.train(resume_from_checkpoint=resume)
    adapters = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return adapters, (callbacks[0] if callbacks else None), model


def test_trainer_callback_schedule_and_resume(tmp_path):
    straight, cb, model = train(tmp_path / "a", max_steps=6)
    ctl = cb.controller
    assert ctl.step_count == 6 and ctl.total_steps == 6
    assert not any(layer.noise_active for layer in ctl.layers.values()), "noise cleared at train end"
    frozen_ok = all(torch.equal(p, q) for (n, p), (_, q) in
                    zip(model.named_parameters(), peft_family("llama")[0].named_parameters()) if not p.requires_grad)
    assert frozen_ok, "frozen weights changed during Trainer training"

    # stop after 3 steps (checkpoint-3), then resume from it up to 6: same adapters, bit for bit
    _, interrupted, _ = train(tmp_path / "b", max_steps=6, stop_after=3)
    assert interrupted.controller.step_count == 3
    resumed, cb_resumed, _ = train(tmp_path / "b", max_steps=6, resume=str(tmp_path / "b" / "checkpoint-3"))
    assert cb_resumed.controller.step_count == 6
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    # and Flat-LoRA changed the result compared with plain LoRA under the same Trainer
    plain, _, _ = train(tmp_path / "c", max_steps=6, callback=False)
    assert any(not torch.equal(plain[n], straight[n]) for n in plain)


def test_callback_sees_one_sample_per_optimizer_step(tmp_path):
    model, _ = peft_family("llama")
    cb = FlatLoraCallback(sigma=0.1, schedule="constant", seed=1)
    seen = []
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=3, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[cb])
    first = model.base_model.model.model.layers[0].self_attn.q_proj
    first.register_forward_pre_hook(lambda mod, a: seen.append(mod.noise_seed) if mod.training else None)
    trainer.train()
    assert len(seen) == 9 and [len(set(seen[i:i + 3])) for i in (0, 3, 6)] == [1, 1, 1] and len(set(seen)) == 3
