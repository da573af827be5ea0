"""Flat-LoRA with fused kernels: LoRA trained under seed-regenerated noise on the merged weight.

Public API:

* :func:`generate_noise`, :func:`merged_row_norms`, :func:`flat_lora_linear` (functional);
* :class:`FlatLoraLinear`, a drop-in subclass of PEFT's LoRA ``Linear``;
* :func:`backend_name` tells which implementation runs for a device.
"""

from .backends import backend_name
from .functional import flat_lora_linear, generate_noise, merged_row_norms
from .layer import FlatLoraLinear

__version__ = "0.1.0"

__all__ = ["FlatLoraLinear", "backend_name", "flat_lora_linear", "generate_noise", "merged_row_norms"]
