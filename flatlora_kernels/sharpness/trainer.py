"""``SharpnessTrainer``: ``transformers.Trainer`` with SAM, ASAM, LoRA-SAM, merged-weight SAM, RWP or Bi-LoRA."""

from __future__ import annotations

import os
from typing import Callable

import torch
from transformers import Trainer, TrainerCallback

from ..checkpoint import save_atomically

STATE_FILE = "sharpness_state.pt"


class _AdvanceMethod(TrainerCallback):
    def __init__(self, trainer: "SharpnessTrainer") -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.method.step()


class SharpnessTrainer(Trainer):
    """A ``Trainer`` whose training step is one micro-batch of a sharpness-aware method.

    ``method_factory(model)`` builds the method once the Trainer holds the model, e.g.
    ``lambda m: fk.SAMPerturber([p for p in m.parameters() if p.requires_grad], rho=0.05)``,
    ``lambda m: fk.MergedSAM(m, rho=0.05)``, ``lambda m: fk.RWP(m, sigma=0.05, scope="lora")`` or
    ``lambda m: fk.BiLoRA(m, rho=0.05)``. Each micro-batch goes through ``method.accumulate`` with
    ``last`` and ``window`` from the Trainer's accumulation (a shorter last window at the end of an
    epoch counts as it is); losses are plain per-micro-batch means, averaged over the window. The
    method's state (RWP's step, Bi-LoRA's auxiliary pair) is saved in every checkpoint
    (``sharpness_state.pt``) and restored on resume, so a resumed run is the straight run, bit for bit.
    """

    def __init__(self, *args, method_factory: Callable[[torch.nn.Module], object], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.method = method_factory(self.model)
        self.add_callback(_AdvanceMethod(self))

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        model.train()
        inputs = self._prepare_inputs(inputs)

        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            return loss.mean() if self.args.n_gpu > 1 else loss

        window = self.current_gradient_accumulation_steps
        loss = self.method.accumulate(closure, last=self.accelerator.sync_gradients, window=window,
                                      backward=self.accelerator.backward)
        return loss / window

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_atomically(self.method.state_dict(), os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, STATE_FILE)
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by a SharpnessTrainer")
            self.method.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
