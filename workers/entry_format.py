"""The cache entry's tensor vocabulary, torch-free: which methods a base is built with, and how tensors are named.

A cache entry stores one flat name -> tensor map (split over safetensors files):

    <module>.qweight.codes / .scales / .zeros / .qmeta     the quantized base (QuantizedTensor.state_dict)
    <module>.lora_A, <module>.lora_B                       LoftQ factors at LoRA scale 1
    <module>.fpweight                                      the full-precision control's (bits 16) frozen weight, bf16
    anything else                                          the untouched rest of the model (embeddings, norms, head)

This module is the one owner of those names; writers (matrix_worker, export) and readers (surgery, entry) use it.
"""

from __future__ import annotations

METHOD_ADAPTER = {"loftq": "lora", "qlora": "lora", "qalora": "qalora"}  # method -> the adapter it trains
METHODS = tuple(METHOD_ADAPTER)  # the methods of a quantized base

# The full-precision control (DESIGN.md): `bits: 16` is plain LoRA over the bf16 base. Its entry keeps each target's
# weight in bf16 under `<module>.fpweight`; quantizer kind, group size and method do not apply to it.
FULL_PRECISION_BITS = 16
FULL_PRECISION_METHOD = "lora"
FULL_PRECISION_DTYPE_NAME = "bfloat16"
ALL_METHODS = (*METHODS, FULL_PRECISION_METHOD)  # every method a cache key may name

QWEIGHT = ".qweight."
QWEIGHT_PARTS = ("codes", "scales", "zeros", "qmeta")
FACTOR_SUFFIXES = (".lora_A", ".lora_B")
FP_WEIGHT = ".fpweight"


def qweight_names(module: str) -> list[str]:
    """The four stored tensors of one quantized matrix."""
    return [f"{module}{QWEIGHT}{part}" for part in QWEIGHT_PARTS]


def is_factor(name: str) -> bool:
    """Whether a stored (or trained) tensor is a LoRA factor (`<module>.lora_A` / `.lora_B`)."""
    return name.endswith(FACTOR_SUFFIXES)
