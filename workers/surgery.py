"""Put a cached quantized base into a model: each target nn.Linear becomes a QuantLoraLinear.

`tensors` is what a cache entry holds (see workers.matrix_worker): quantized matrices under
`<module>.qweight.*`, LoftQ factors under `<module>.lora_A/B` (at LoRA scale 1), and every other tensor
of the model under its own name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from workers.matrix_worker import is_factor
from workers.qlayers import QuantLoraLinear
from workers.quant import QuantizedTensor

QWEIGHT = ".qweight."


def quantized_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Modules that have a quantized weight in `tensors`."""
    return sorted(k[: -len(QWEIGHT + "qmeta")] for k in tensors if k.endswith(QWEIGHT + "qmeta"))


def is_plain(name: str) -> bool:
    """Whether an entry tensor is an ordinary model tensor (neither a quantized part nor a LoftQ factor)."""
    return QWEIGHT not in name and not is_factor(name)


def quantized_tensor(tensors: dict[str, torch.Tensor], module: str) -> QuantizedTensor:
    """The QuantizedTensor stored for `module` in entry-layout `tensors`."""
    prefix = f"{module}{QWEIGHT}"
    return QuantizedTensor.from_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def apply_quantized_base(
    model: nn.Module,
    tensors: dict[str, torch.Tensor],
    *,
    rank: int = 0,
    alpha: float | None = None,
    adapter: str = "lora",
    dropout: float = 0.0,
    init: str = "loftq",
    prefix: str = "",
) -> list[str]:
    """Replace target linears with quantized LoRA layers and load every other tensor; returns the targets.

    `init="loftq"` loads the entry's factors (rescaled from scale 1 to alpha / rank: each factor is
    divided by sqrt(scale), which keeps scale * B @ A unchanged); `init="qlora"` keeps a random A and B = 0.
    `prefix` maps entry names onto the model's (e.g. "bert." for a task model wrapping BertModel).
    """
    scale = (alpha if alpha is not None else rank) / rank if rank else 1.0
    targets = quantized_modules(tensors)
    for module in targets:
        layer = QuantLoraLinear(quantized_tensor(tensors, module), tensors.get(f"{module}.bias"),
                                rank=rank, scale=scale, adapter=adapter, dropout=dropout)
        if init == "loftq" and rank:
            A, B = tensors.get(f"{module}.lora_A"), tensors.get(f"{module}.lora_B")
            if A is None or B is None:
                raise ValueError(f"{module}: the cache entry has no LoftQ factors for rank {rank}")
            layer.set_adapter(A / math.sqrt(scale), B / math.sqrt(scale))
        elif init != "qlora" and rank:
            raise ValueError(f"init: expected 'loftq' or 'qlora', got {init!r}")
        model.set_submodule(prefix + module, layer)
    target_biases = {f"{m}.bias" for m in targets}  # already inside their QuantLoraLinear
    # non-persistent buffers (e.g. BERT's position_ids) are rebuilt by the model, not loaded
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    rest = {prefix + k: v for k, v in tensors.items()
            if is_plain(k) and k not in target_biases and prefix + k not in transient}
    # keys the model lacks are an error; keys the entry lacks (a new task head) keep their fresh init
    unexpected = model.load_state_dict(rest, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"cache entry tensors not in the model: {unexpected[:5]} (prefix {prefix!r}?)")
    return targets


def dequantized_state_dict(tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict:
    """A plain full-precision state dict: every quantized matrix dequantized back to `<module>.weight`."""
    from workers.quant import dequantize

    out = {k: v for k, v in tensors.items() if is_plain(k)}
    for module in quantized_modules(tensors):
        out[f"{module}.weight"] = dequantize(quantized_tensor(tensors, module), dtype)
    return out
