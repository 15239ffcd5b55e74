"""The cache entry's tensor vocabulary, torch-free: which methods a base is built with, and how tensors are named.

A cache entry stores one flat name -> tensor map (split over safetensors files):

    <module>.qweight.codes / .scales / .zeros / .qmeta     the quantized base (QuantizedTensor.state_dict)
    <module>.lora_A, <module>.lora_B                       LoftQ factors at LoRA scale 1
    <module>.fpweight                                      the full-precision control's (bits 16) frozen weight, bf16
    anything else                                          the untouched rest of the model (embeddings, norms, head)

This module is the one owner of those names: writers (matrix_worker, export) and readers (surgery,
orchestrator.entry) build and parse them only through it. Nothing here needs torch: values are passed through.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

# method -> the adapter it trains. cloq: LoftQ's alternation with the low-rank step weighted by calibration inputs
# (workers/cloq.py); its entry has the same layout as LoftQ's, its key and manifest record the calibration data.
# qalora-cloq: QA-LoRA (pooled adapter, INT only) with that calibrated initialization.
METHOD_ADAPTER = {"loftq": "lora", "qlora": "lora", "qalora": "qalora", "cloq": "lora", "qalora-cloq": "qalora"}
METHODS = tuple(METHOD_ADAPTER)  # the methods of a quantized base
CALIBRATED_METHODS = ("cloq", "qalora-cloq")  # the methods that need calibration data (each layer's input Gram)

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

Value = TypeVar("Value")


def adapter_for(method: str | None) -> str:
    """The adapter a base built with `method` trains: 'qalora' for QA-LoRA, else 'lora' (the full-precision control,
    and entries whose method is not recorded)."""
    return METHOD_ADAPTER.get(method or "", "lora")


def qweight_name(module: str, part: str) -> str:
    """The stored name of one part of a quantized matrix (`part` is a key of QuantizedTensor.state_dict)."""
    return f"{module}{QWEIGHT}{part}"


def qweight_names(module: str) -> list[str]:
    """The four stored tensors of one quantized matrix."""
    return [qweight_name(module, part) for part in QWEIGHT_PARTS]


def qweight_tensors(module: str, parts: Mapping[str, Value]) -> dict[str, Value]:
    """A quantized matrix's state dict (part -> tensor) under its stored names."""
    return {qweight_name(module, part): value for part, value in parts.items()}


def qweight_parts(tensors: Mapping[str, Value], module: str) -> dict[str, Value]:
    """The parts (part -> tensor) of `module`'s quantized matrix in entry-layout `tensors`: the inverse of
    `qweight_tensors`."""
    prefix = module + QWEIGHT
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def factor_names(module: str) -> tuple[str, str]:
    """The stored names of `module`'s LoftQ factors: (A, B)."""
    return module + FACTOR_SUFFIXES[0], module + FACTOR_SUFFIXES[1]


def fp_weight_name(module: str) -> str:
    """The stored name of the full-precision control's weight of `module`."""
    return module + FP_WEIGHT


def is_factor(name: str) -> bool:
    """Whether a stored (or trained) tensor is a LoRA factor (`<module>.lora_A` / `.lora_B`)."""
    return name.endswith(FACTOR_SUFFIXES)


def is_plain(name: str) -> bool:
    """Whether an entry tensor is an ordinary model tensor (not a quantized part, a control's weight or a factor)."""
    return QWEIGHT not in name and not name.endswith(FP_WEIGHT) and not is_factor(name)


def quantized_modules(names: Iterable[str]) -> list[str]:
    """The modules that have a quantized weight among the entry tensor `names`, sorted."""
    marker = qweight_name("", "qmeta")
    return sorted(name.removesuffix(marker) for name in names if name.endswith(marker))


def full_precision_modules(names: Iterable[str]) -> list[str]:
    """The modules that have a full-precision control weight (`<module>.fpweight`) among `names`, sorted."""
    return sorted(name.removesuffix(FP_WEIGHT) for name in names if name.endswith(FP_WEIGHT))
