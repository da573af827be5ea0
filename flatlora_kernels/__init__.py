"""Flat-LoRA with fused kernels: LoRA trained under seed-regenerated noise on the merged weight.

Public API:

* :func:`generate_noise`, :func:`merged_row_norms`, :func:`flat_lora_linear` (functional);
* :class:`FlatLoraLinear`, a drop-in subclass of PEFT's LoRA ``Linear`` (vanilla LoRA, ``lora_bias``, DoRA),
  :class:`FlatSVDLinear` for AdaLoRA's ``SVDLinear`` (``FlatLoraLinear4bit`` for QLoRA's
  ``lora.bnb.Linear4bit`` where bitsandbytes is installed);
* :class:`FlatLoraConfig` (:mod:`~flatlora_kernels.config`), :func:`apply_flat_lora` (takes a config or
  its fields, returns a :class:`FlatLora` controller) and :func:`register_flat_lora`
  (:mod:`~flatlora_kernels.controller`), and :class:`FlatLoraCallback` for ``transformers.Trainer``
  (:mod:`~flatlora_kernels.callback`) to train with it;
* :mod:`flatlora_kernels.sharpness`: :class:`SAM`, :class:`SAMPerturber`, :class:`MergedSAM`, :class:`RWP`,
  :class:`BiLoRA` and :class:`SharpnessTrainer`, the sharpness-aware neighbours;
* :mod:`flatlora_kernels.flatness`: Hessian spectra, sharpness and loss surfaces of the merged weights;
* :func:`save_atomically` and :func:`last_complete_checkpoint` (:mod:`~flatlora_kernels.checkpoint`): saving a
  crash cannot corrupt, and the newest Trainer checkpoint a crash did not cut short;
* :func:`backend_name` tells which implementation runs for a device, :func:`path_name` which GPU path
  (fused kernels or slabs, :mod:`~flatlora_kernels.paths`) a call takes; :func:`native_available`
  whether the compiled C++ ops are installed.
"""

from typing import TYPE_CHECKING

from .backends import backend_name
from .checkpoint import last_complete_checkpoint, save_atomically
from .functional import flat_lora_linear, generate_noise, merged_row_norms
from .config import FlatLoraConfig
from .controller import FlatLora, apply_flat_lora, register_flat_lora
from . import layer
from .layer import FlatLoraLinear, FlatSVDLinear
from .native import native_available
from .paths import path_name
from .sharpness import RWP, SAM, BiLoRA, MergedSAM, SAMPerturber

__version__ = "0.1.0"

if TYPE_CHECKING:  # the lazy names below, visible to type checkers and the API docs without importing them
    from . import flatness
    from .layer import FlatLoraLinear4bit
    from .sharpness.trainer import SharpnessTrainer
    from .callback import FlatLoraCallback

__all__ = ["FlatLora", "FlatLoraCallback", "FlatLoraConfig", "FlatLoraLinear", "FlatSVDLinear", "apply_flat_lora",
           "backend_name", "flat_lora_linear", "generate_noise", "last_complete_checkpoint", "merged_row_norms",
           "native_available", "path_name", "register_flat_lora", "save_atomically",
           "BiLoRA", "MergedSAM", "RWP", "SAM", "SAMPerturber", "SharpnessTrainer", "flatness"]
if layer.LoraLinear4bit is not None:  # FlatLoraLinear4bit exists where bitsandbytes does
    __all__.append("FlatLoraLinear4bit")


def __getattr__(name):
    if name == "FlatLoraCallback":  # imports transformers, so only on demand
        from .callback import FlatLoraCallback

        return FlatLoraCallback
    if name == "FlatLoraLinear4bit":  # exists where bitsandbytes does (pip install flatlora-kernels[qlora])
        if layer.LoraLinear4bit is None:
            raise AttributeError("FlatLoraLinear4bit needs bitsandbytes: pip install flatlora-kernels[qlora]")
        return layer.FlatLoraLinear4bit
    if name == "SharpnessTrainer":
        from .sharpness.trainer import SharpnessTrainer

        return SharpnessTrainer
    if name == "flatness":
        import importlib

        return importlib.import_module(".flatness", __name__)
    raise AttributeError(f"module 'flatlora_kernels' has no attribute {name!r}")
