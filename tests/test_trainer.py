"""FlatLoraCallback with transformers.Trainer: gradient accumulation, the schedule, resume."""

import json
import math
import shutil

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from flatlora_kernels import FlatLoraCallback, last_complete_checkpoint

from .helpers import TokenData, interrupt_after, peft_family


class PoisonTrainer(Trainer):
    """A Trainer whose loss is inf in every micro-batch of one optimizer step (``poison_step``, 0-based)."""

    poison_step = None

    def compute_loss(self, model, inputs, *args, **kwargs):
        loss = super().compute_loss(model, inputs, *args, **kwargs)
        return loss * math.inf if self.state.global_step == self.poison_step else loss


class RecordAdapters(TrainerCallback):
    def __init__(self):
        self.after_step = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.after_step.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def train(output_dir, max_steps, resume=None, sigma=0.1, callback=True, stop_after=None, poison_step=None,
          extra_callbacks=(), **flat_lora):
    model, _ = peft_family("llama")
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=5e-3, save_steps=3, save_strategy="steps",
                             logging_steps=100, report_to=[], use_cpu=True, seed=0, data_seed=0,
                             dataloader_num_workers=0, disable_tqdm=True)
    callbacks = [FlatLoraCallback(**{"sigma": sigma, "seed": 7, **flat_lora})] if callback else []
    stop = [interrupt_after(stop_after)] if stop_after else []
    trainer = PoisonTrainer(model=model, args=args, train_dataset=TokenData(),
                            callbacks=callbacks + stop + list(extra_callbacks))
    trainer.poison_step = poison_step
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


def test_callback_saves_and_checks_what_it_resumes(tmp_path):
    # resample_every=2: at checkpoint-3 the sample in use was drawn after step 2, from other weights than the
    # checkpoint's, so only the saved sample resumes bitwise
    straight, _, _ = train(tmp_path / "a", max_steps=6, resample_every=2)
    train(tmp_path / "b", max_steps=6, stop_after=3, resample_every=2)
    checkpoint = tmp_path / "b" / "checkpoint-3"
    assert (checkpoint / "flat_lora_state.pt").is_file()
    with pytest.raises(ValueError, match="sigma=0.1 saved, 0.2 now.*allow_config_change"):
        train(tmp_path / "b", max_steps=6, resume=str(checkpoint), sigma=0.2, resample_every=2)
    with pytest.raises(ValueError, match="seed=7 saved, 8 now"):
        train(tmp_path / "b", max_steps=6, resume=str(checkpoint), seed=8, resample_every=2)

    # a crash half-way through saving checkpoint-6: it lacks the files written last; resume from the one before
    half_written = tmp_path / "b" / "checkpoint-6"
    shutil.copytree(checkpoint, half_written)
    (half_written / "flat_lora_state.pt").unlink()
    trainer_state = half_written / "trainer_state.json"
    trainer_state.write_text(json.dumps({**json.loads(trainer_state.read_text()), "global_step": 6}))
    assert last_complete_checkpoint(tmp_path / "b") == str(checkpoint)
    with pytest.raises(FileNotFoundError, match="flat_lora_state.pt is missing.*last_complete_checkpoint"):
        train(tmp_path / "b", max_steps=6, resume=str(half_written), resample_every=2)
    shutil.rmtree(half_written)
    resumed, _, _ = train(tmp_path / "b", max_steps=6, resume=last_complete_checkpoint(tmp_path / "b"),
                          resample_every=2)
    assert all(torch.equal(straight[n], resumed[n]) for n in straight)


def test_callback_nonfinite_raise_and_skip(tmp_path):
    with pytest.raises(FloatingPointError, match=r"gradient of .*lora_[AB]\.default holds NaN/inf at optimizer "
                                                 r"step 3.*input"):
        train(tmp_path / "raise", max_steps=4, poison_step=2)
    record = RecordAdapters()
    with pytest.warns(RuntimeWarning, match="step 3.*skipped"):
        _, cb, _ = train(tmp_path / "skip", max_steps=4, poison_step=2, on_nonfinite="skip",
                         extra_callbacks=[record])
    before, skipped, after = record.after_step[1:4]
    assert all(torch.equal(before[n], skipped[n]) for n in before), "the skipped step changed the adapters"
    assert any(not torch.equal(skipped[n], after[n]) for n in after)
    assert cb.controller.step_count == 3, "the skipped step kept its noise sample"
