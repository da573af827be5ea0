"""Every sharpness-aware method trains under transformers.Trainer with accumulation, and resumes bit for bit."""

import pytest
import torch
from transformers import Trainer, TrainingArguments

import flatlora_kernels as fk

from .helpers import TokenData, peft_family, trainable

WINDOW = 2


# method -> (factory, forward passes per optimizer step with WINDOW micro-batches)
METHODS = {
    "sam": (lambda m: fk.SAMPerturber(trainable(m).values(), rho=0.05), WINDOW + 1),
    "asam": (lambda m: fk.SAMPerturber(trainable(m).values(), rho=0.5, adaptive=True), WINDOW + 1),
    "lora_sam": (lambda m: fk.SAMPerturber(trainable(m).values(), rho=0.05, per_tensor=True), WINDOW + 1),
    "merged_sam": (lambda m: fk.MergedSAM(m, rho=0.05), WINDOW + 1),
    "rwp_merged": (lambda m: fk.RWP(m, sigma=0.1, scope="merged", seed=3), WINDOW),
    "rwp_lora": (lambda m: fk.RWP(m, sigma=0.1, scope="lora", seed=3), WINDOW),
    "bilora": (lambda m: fk.BiLoRA(m, rho=0.05, ascent_lr=1.0), WINDOW),
}


def train(output_dir, method=None, resume=None, max_steps=4):
    model, _ = peft_family("llama")
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                             gradient_accumulation_steps=WINDOW, learning_rate=5e-3, save_steps=2,
                             save_strategy="steps" if method else "no", logging_steps=100, report_to=[],
                             use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    forwards = []
    model.base_model.model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, a: forwards.append(1))
    if method is None:
        trainer = Trainer(model=model, args=args, train_dataset=TokenData())
    else:
        trainer = fk.SharpnessTrainer(model=model, args=args, train_dataset=TokenData(),
                                      method_factory=METHODS[method][0])
    trainer.train(resume_from_checkpoint=resume)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return weights, len(forwards), trainer


@pytest.fixture(scope="module")
def plain_lora(tmp_path_factory):
    return train(tmp_path_factory.mktemp("plain"))[0]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_trains_and_resumes_bitwise(method, plain_lora, tmp_path):
    straight, forwards, trainer = train(tmp_path, method)
    assert forwards == 4 * METHODS[method][1], "passes per optimizer step"
    assert trainer.state.global_step == 4
    changed = [n for n in straight if not torch.equal(straight[n], plain_lora[n])]
    assert changed and all("lora_" in n for n in changed), "only the adapters move, and differently from LoRA"
    assert all(torch.isfinite(w).all() for w in straight.values())
    resumed, _, _ = train(tmp_path, method, resume=str(tmp_path / "checkpoint-2"))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
