"""FlatLoraCallback with TRL's SFTTrainer on a tiny causal LM: trains, resumes bit for bit, saves a plain PEFT
adapter."""

import pytest
import torch
from peft import PeftModel

from flatlora_kernels import FlatLoraCallback

from .helpers import VOCAB, interrupt_after, llama, peft_family

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _tokenizer():
    """A word-level tokenizer built in memory (no download): SFTTrainer needs one for padding."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="w0")),
                                   pad_token="w1", eos_token="w2")


def _sft(output_dir, max_steps, resume=None, callback=True, stop_after=None):
    ids = torch.randint(3, VOCAB, (48, 9), generator=torch.Generator().manual_seed(0))
    data = datasets.Dataset.from_dict({"input_ids": ids.tolist()})  # already tokenized: SFTTrainer keeps it
    model, _ = peft_family("llama")
    args = trl.SFTConfig(output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=4,
                         gradient_accumulation_steps=2, learning_rate=5e-3, save_steps=2, report_to=[],
                         use_cpu=True, seed=0, data_seed=0, disable_tqdm=True, logging_steps=100)
    callbacks = [FlatLoraCallback(sigma=0.1, seed=7)] if callback else []
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=_tokenizer(),
                             callbacks=callbacks + ([interrupt_after(stop_after)] if stop_after else []))
    trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, callbacks, trainer


def test_sft_trainer_trains_resumes_bitwise_and_saves_plain_peft(tmp_path):
    straight, (callback,), trainer = _sft(tmp_path / "a", max_steps=4)
    assert callback.controller.step_count == 4 and not callback.controller.skipped
    _, (interrupted,), _ = _sft(tmp_path / "b", max_steps=4, stop_after=2)
    assert interrupted.controller.step_count == 2
    resumed, _, _ = _sft(tmp_path / "b", max_steps=4, resume=str(tmp_path / "b" / "checkpoint-2"))
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    plain, _, _ = _sft(tmp_path / "c", max_steps=4, callback=False)
    assert any(not torch.equal(plain[n], straight[n]) for n in plain), "the noise must change the result"

    trainer.save_model(str(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(llama()[0], str(tmp_path / "adapter"))
    lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert lora.keys() == straight.keys()
    for name, param in lora.items():
        assert torch.equal(param, straight[name]), name
