"""The sharpness-aware family beside Flat-LoRA, one interface for all of it.

* :class:`SAM` (optimizer wrapper) and :class:`SAMPerturber`: SAM, ASAM (``adaptive``), LoRA-SAM
  (``per_tensor`` on the LoRA factors);
* :class:`MergedSAM`: SAM on the merged weight ``W + s·BA`` without an m×n tensor;
* :class:`RWP`: random weight perturbation with a mixed clean/noisy gradient, merged or LoRA-only scope;
* :class:`BiLoRA`: an auxiliary LoRA pair trained by ascent in the same backward pass;
* :class:`SharpnessTrainer` (``flatlora_kernels.sharpness.trainer``): any of them in ``transformers.Trainer``.

Every method has ``accumulate(closure, last=..., window=...)`` (one micro-batch of a gradient-accumulation
window, backward included), ``step()`` (after the optimizer step), ``state_dict``/``load_state_dict``.
"""

from .bilora import BiLoRA
from .merged_sam import MergedSAM
from .rwp import RWP
from .sam import SAM, SAMPerturber

__all__ = ["BiLoRA", "MergedSAM", "RWP", "SAM", "SAMPerturber", "SharpnessTrainer"]


def __getattr__(name):
    if name == "SharpnessTrainer":  # imports transformers, so only on demand
        from .trainer import SharpnessTrainer

        return SharpnessTrainer
    raise AttributeError(f"module 'flatlora_kernels.sharpness' has no attribute {name!r}")
