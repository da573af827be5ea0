"""Saving that a crash cannot corrupt, and finding the last checkpoint a crash did not cut short.

No transformers import here: plain training loops use :func:`save_atomically` too.
"""

from __future__ import annotations

import os

import torch

STATE_FILE = "flat_lora_state.pt"  # what FlatLoraCallback adds to every Trainer checkpoint, written last
TRAINER_STATE_FILE = "trainer_state.json"  # the Trainer's own last file of a checkpoint
CHECKPOINT_PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR: checkpoint-<global step>


def save_atomically(obj: object, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the same folder and ``os.replace``: a crash
    leaves either the old file or the new one, never a truncated one."""
    path = os.fspath(path)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-N`` folder of ``output_dir`` that a :class:`FlatLoraCallback` run finished
    writing, or None. ``FlatLoraCallback`` writes its state last (after the Trainer's ``trainer_state.json``),
    so a folder a crash cut short lacks it; pass the result as ``resume_from_checkpoint``."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    steps = []
    for name in os.listdir(output_dir):
        prefix, _, number = name.partition("-")
        folder = os.path.join(output_dir, name)
        if prefix == CHECKPOINT_PREFIX and number.isdigit() and \
                all(os.path.isfile(os.path.join(folder, f)) for f in (TRAINER_STATE_FILE, STATE_FILE)):
            steps.append((int(number), folder))
    return max(steps)[1] if steps else None
