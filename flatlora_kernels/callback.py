"""``FlatLoraCallback``: Flat-LoRA for ``transformers.Trainer``, with checked gradients and checked resume."""

from __future__ import annotations

import dataclasses
import os

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from . import nonfinite
from .checkpoint import STATE_FILE, save_atomically
from .config import FlatLoraConfig, resolve_config
from .controller import FlatLora, apply_flat_lora


class FlatLoraCallback(TrainerCallback):
    """Applies Flat-LoRA when training begins and advances the schedule after each optimizer step.

    Takes a :class:`FlatLoraConfig` or its fields as keywords (``FlatLoraCallback(sigma=0.05)``),
    validated here, before training starts. ``total_steps`` defaults to the Trainer's ``max_steps``.
    ``strict`` and ``on_nonfinite`` are as in :func:`flatlora_kernels.apply_flat_lora`.

    Non-finite values: before every optimizer step (``on_pre_optimizer_step``, after gradient clipping) the
    LoRA gradients are checked (:meth:`FlatLora.check_gradients`); with ``"skip"`` the gradients of the whole
    model are cleared, so the step changes neither the weights nor the optimizer state, and the noise sample
    is kept (the Trainer's learning-rate schedule still advances). Under ``fp16=True`` the Trainer's
    GradScaler owns inf/NaN steps; the callback counts the steps it skips (see ``FlatLora.max_skipped_steps``).

    Checkpoints: every checkpoint gets ``flat_lora_state.pt`` (:meth:`FlatLora.state_dict`: the step, the
    config, the noise contract version and the current sample), written last and atomically. On resume it
    is read back from ``<output_dir>/checkpoint-<global_step>`` and checked against this run's config (a
    mismatch is an error naming both values unless ``allow_config_change=True``); the sample is the saved
    one, so the resumed run is the straight run, bit for bit.
    """

    def __init__(self, config: FlatLoraConfig | None = None, *, strict: bool = False, on_nonfinite: str = "raise",
                 allow_config_change: bool = False, **options) -> None:
        self.config = resolve_config(config, options, owner="FlatLoraCallback")
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        if not isinstance(allow_config_change, bool):
            raise TypeError(f"allow_config_change must be a bool, got {allow_config_change!r}")
        self.strict = strict
        self.on_nonfinite = nonfinite.check_policy(on_nonfinite)
        self.allow_config_change = allow_config_change
        self.controller: FlatLora | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("FlatLoraCallback needs the model; the Trainer passes it to callbacks")
        if self.controller is None:
            config = dataclasses.replace(self.config, total_steps=self.config.total_steps or state.max_steps)
            self.controller = apply_flat_lora(model, config, strict=self.strict, on_nonfinite=self.on_nonfinite)
        self.controller._set_watching(True)
        if state.global_step == 0:
            if self.controller.step_count:  # train() again from scratch with the same callback
                self.controller.step_count = 0
                self.controller.resample()
            return
        path = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming at step {state.global_step}, but {path} is missing: the checkpoint was written without "
                "FlatLoraCallback, cut short by a crash (resume from last_complete_checkpoint(output_dir) "
                "instead), or lies outside args.output_dir")
        saved = torch.load(path, map_location="cpu", weights_only=False)
        if saved.get("global_step") != state.global_step:
            raise ValueError(f"{path} was saved at Trainer step {saved.get('global_step')!r}, the checkpoint "
                             f"resumes at {state.global_step}")
        self.controller.load_state_dict(saved["controller"], allow_config_change=self.allow_config_change)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not args.fp16:  # under fp16 the GradScaler skips inf/NaN steps itself
            self.controller.check_gradients(model.parameters())

    def on_step_end(self, args, state, control, **kwargs):
        self.controller.step()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            save_atomically({"controller": self.controller.state_dict(), "global_step": state.global_step},
                            os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, **kwargs):
        self.controller.clear()
