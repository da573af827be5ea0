"""``FlatLoraCallback``: Flat-LoRA for ``transformers.Trainer``."""

from __future__ import annotations

import dataclasses

from transformers import TrainerCallback

from .config import FlatLoraConfig, resolve_config
from .controller import FlatLora, apply_flat_lora


class FlatLoraCallback(TrainerCallback):
    """Applies Flat-LoRA when training begins and advances the schedule after each optimizer step.

    Takes a :class:`FlatLoraConfig` or its fields as keywords (``FlatLoraCallback(sigma=0.05)``),
    validated here, before training starts. ``total_steps`` defaults to the Trainer's
    ``max_steps``. On resume from a checkpoint the noise sequence continues where it was: the
    controller's state is its step count, which the Trainer restores (``state.global_step``), and
    the weights it redraws ``c`` from are the checkpoint's. ``strict`` is as in
    :func:`flatlora_kernels.apply_flat_lora`.
    """

    def __init__(self, config: FlatLoraConfig | None = None, *, strict: bool = False, **options) -> None:
        self.config = resolve_config(config, options, owner="FlatLoraCallback")
        self.strict = strict
        self.controller: FlatLora | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FlatLoraCallback needs the model; the Trainer passes it to callbacks")
        if self.controller is None:
            config = dataclasses.replace(self.config, total_steps=self.config.total_steps or state.max_steps)
            self.controller = apply_flat_lora(model, config, strict=self.strict)
        self.controller.load_state_dict({"step": state.global_step})

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.clear()
