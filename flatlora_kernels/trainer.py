"""``FlatLoraCallback``: Flat-LoRA for ``transformers.Trainer``."""

from __future__ import annotations

from transformers import TrainerCallback

from .integration import FlatLora, Schedule, apply_flat_lora


class FlatLoraCallback(TrainerCallback):
    """Applies Flat-LoRA when training begins and advances the schedule after each optimizer step.

    ``total_steps`` defaults to the Trainer's ``max_steps``. On resume from a checkpoint the
    noise sequence continues where it was: the controller's state is its step count, which the
    Trainer restores (``state.global_step``), and the weights it redraws ``c`` from are the
    checkpoint's. The other arguments are those of :func:`flatlora_kernels.apply_flat_lora`.
    """

    def __init__(self, sigma: float = 0.05, schedule: Schedule = "cosine", total_steps: int | None = None,
                 resample_every: int = 1, seed: int = 0, per_rank_noise: bool = True) -> None:
        self.options = dict(sigma=sigma, schedule=schedule, total_steps=total_steps,
                            resample_every=resample_every, seed=seed, per_rank_noise=per_rank_noise)
        self.controller: FlatLora | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FlatLoraCallback needs the model; the Trainer passes it to callbacks")
        if self.controller is None:
            options = dict(self.options)
            options["total_steps"] = options["total_steps"] or state.max_steps
            self.controller = apply_flat_lora(model, **options)
        self.controller.load_state_dict({"step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.clear()
