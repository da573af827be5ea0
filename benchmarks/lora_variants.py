"""The LoRA variants of the Flat-LoRA paper's Table 5 as PEFT configurations of the main job.

Each variant is the main job's LoRA (rank ``r``, ``alpha = 2r``, every encoder linear layer) changed the way
the variant's paper changes it:

* ``lora``: PEFT's default initialisation (Kaiming ``A``, zero ``B``);
* ``dora``: ``use_dora=True`` (a learned magnitude per output row);
* ``pissa``: ``init_lora_weights="pissa"`` (``A``, ``B`` from the top singular vectors of ``W``; the base
  keeps the residual);
* ``lora_ga``: ``init_lora_weights="lora_ga"``: ``A``, ``B`` from the singular vectors of the loss gradient
  with respect to ``W``, estimated on ``LORA_GA_BATCHES`` batches of the training split before PEFT wraps
  the encoder (through a freshly initialised regression head; the base keeps the residual);
* ``adalora``: AdaLoRA (``B·(A ⊙ E)``, rank budget from ``1.5r`` down to ``r`` between 10% and 70% of the
  run), whose allocator runs after each optimizer step (:attr:`Variant.after_optimizer_step`).

With Flat-LoRA the variant is trained under the merged-weight noise of :func:`flatlora_kernels.apply_flat_lora`
(which adopts every one of these layers: see ``docs/support-matrix.md``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

NAMES = ("lora", "dora", "pissa", "lora_ga", "adalora")
LORA_GA_BATCHES = 4


@dataclass(frozen=True)
class Variant:
    """What :func:`finetune_minilm.build` and the training loop need for one variant."""

    peft_config: object
    prepare: Callable[[torch.nn.Module, object], None] | None = None  # on the base encoder, before PEFT wraps it
    after_optimizer_step: Callable[[torch.nn.Module, int], None] | None = None  # (model, step from 1), before zero_grad


def make_variant(name: str, rank: int, steps: int, targets: list[str], data: list[tuple[str, float]],
                 batch_size: int, seed: int) -> Variant:
    """The variant ``name`` for a run of ``steps`` optimizer steps on (text, target) ``data``."""
    from peft import AdaLoraConfig, LoraConfig

    common = dict(r=rank, lora_alpha=2 * rank, target_modules=targets)
    if name == "lora":
        return Variant(LoraConfig(**common))
    if name == "dora":
        return Variant(LoraConfig(**common, use_dora=True))
    if name == "pissa":
        return Variant(LoraConfig(**common, init_lora_weights="pissa"))
    if name == "lora_ga":
        from peft.tuners.lora import LoraGAConfig

        config = LoraConfig(**common, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
        return Variant(config, prepare=_lora_ga_gradients(config, data, batch_size, seed))
    if name == "adalora":
        config = AdaLoraConfig(init_r=rank + rank // 2, target_r=rank, lora_alpha=2 * rank, target_modules=targets,
                               tinit=steps // 10, tfinal=3 * steps // 10, deltaT=max(1, steps // 20),
                               total_step=steps)
        # PEFT counts the allocator's steps from 0 (train_loop's from 1)
        return Variant(config, after_optimizer_step=lambda model, step: model.encoder.base_model.update_and_allocate(
            step - 1))
    raise ValueError(f"unknown LoRA variant {name!r}; expected one of {NAMES}")


def _lora_ga_gradients(config, data, batch_size: int, seed: int):
    """LoRA-GA's preprocessing: the gradient of the regression loss with respect to every target weight,
    accumulated over the first ``LORA_GA_BATCHES`` batches of a seeded order of ``data``."""
    from peft.tuners.lora.loraga import preprocess_loraga

    def prepare(encoder: torch.nn.Module, tokenizer) -> None:
        import finetune_minilm as job  # the main job's regressor (examples/ is on sys.path in the benchmarks)

        regressor = job.Regressor(encoder, encoder.config.hidden_size)  # its head: the seeded global RNG
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()

        def train_step() -> None:
            for first in range(0, LORA_GA_BATCHES * batch_size, batch_size):
                batch = [data[i] for i in order[first:first + batch_size]]
                enc = tokenizer([t for t, _ in batch], padding=True, return_tensors="pt")
                pred = regressor(enc["input_ids"], enc["attention_mask"])
                torch.nn.functional.mse_loss(pred, torch.tensor([y for _, y in batch])).backward()

        with warnings.catch_warnings():
            # PEFT's gradient hooks are full backward hooks, and the token ids need no gradient: torch says so
            # once per layer; expected here, so silenced for the estimate only
            warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
            preprocess_loraga(encoder, config, train_step)

    return prepare
