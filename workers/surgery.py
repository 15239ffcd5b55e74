"""Put a cached quantized base into a model: each target nn.Linear becomes a QuantLoraLinear.

`tensors` is what a cache entry holds (named as workers/entry_format.py says): quantized matrices under
`<module>.qweight.*`, LoftQ factors under `<module>.lora_A/B` (at LoRA scale 1), and every other tensor
of the model under its own name. The full-precision control's entry (bits 16) holds each target's bf16 weight
under `<module>.fpweight` instead: those targets become FullPrecisionLoraLinear layers (plain LoRA).

A worker's model never exists in full precision: `empty_parameters` builds the architecture with its
parameters on the meta device, `apply_quantized_base` puts the entry in place, and `init_missing` allocates
and initializes what the entry does not hold (a fresh task head).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from workers.entry_format import (
    factor_names,
    fp_weight_name,
    full_precision_modules,
    is_plain,
    quantized_modules,
    qweight_parts,
)
from workers.qlayers import FullPrecisionLoraLinear, QuantLoraLinear
from workers.quant import QuantizedTensor


def quantized_tensor(tensors: dict[str, torch.Tensor], module: str) -> QuantizedTensor:
    """The QuantizedTensor stored for `module` in entry-layout `tensors`."""
    return QuantizedTensor.from_state_dict(qweight_parts(tensors, module))


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
    Targets of the full-precision control (`<module>.fpweight`) become FullPrecisionLoraLinear layers over that
    weight, as it is (no copy); they have no factors, so they take `init="qlora"` and adapter "lora".
    """
    scale = (alpha if alpha is not None else rank) / rank if rank else 1.0
    quantized, full_precision = quantized_modules(tensors), full_precision_modules(tensors)
    targets = sorted([*quantized, *full_precision])
    for module in targets:
        bias = tensors.get(f"{module}.bias")
        if module in quantized:
            layer = QuantLoraLinear(quantized_tensor(tensors, module), bias, rank=rank, scale=scale, adapter=adapter,
                                    dropout=dropout)
        else:
            layer = FullPrecisionLoraLinear(tensors[fp_weight_name(module)], bias, rank=rank, scale=scale,
                                            adapter=adapter, dropout=dropout)
        if init == "loftq" and rank:
            A, B = (tensors.get(name) for name in factor_names(module))
            if A is None or B is None:
                control = " (a bits-16 control entry: plain LoRA starts from init 'qlora')" * (module not in quantized)
                raise ValueError(f"{module}: the cache entry has no LoftQ factors for rank {rank}{control}")
            layer.set_adapter(A / math.sqrt(scale), B / math.sqrt(scale))
        elif init != "qlora" and rank:
            raise ValueError(f"init: expected 'loftq' or 'qlora', got {init!r}")
        model.set_submodule(prefix + module, layer)
    load_plain_tensors(model, tensors, prefix=prefix, skip={f"{m}.bias" for m in targets})  # biases: in the layers
    return targets


def load_plain_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], *, prefix: str = "",
                       skip: set[str] = frozenset()) -> list[str]:
    """Load the entry's plain tensors (embeddings, norms, biases, a stored head) into `model`; returns their names.

    Each value takes the dtype of the tensor it fills, as `load_state_dict` does. A real tensor is copied into;
    a tensor on the meta device is replaced by the entry's own tensor (converted only if its dtype differs:
    frozen, so the worker holds it once), and every module sharing that parameter (tied embeddings) gets the
    same one, so a model built with `empty_parameters` stays tied. Non-persistent buffers (e.g. BERT's
    position_ids) are the model's own and are not loaded; an entry tensor the model lacks is a ValueError.
    """
    transient = {n for n, _ in model.named_buffers()} - set(model.state_dict())
    owners, assigned = _parameter_owners(model), {}
    loaded, unexpected = [], []
    for key, value in tensors.items():
        name = prefix + key
        if not is_plain(key) or key in skip or name in transient:
            continue
        (loaded if _fill(model, name, value, owners, assigned) else unexpected).append(name)
    if unexpected:
        raise ValueError(f"cache entry tensors not in the model: {unexpected[:5]} (prefix {prefix!r}?)")
    return loaded


def _parameter_owners(model: nn.Module) -> dict[int, tuple[nn.Parameter, list[tuple[nn.Module, str]]]]:
    """id(parameter) -> (the parameter, every (module, attribute) holding it); the parameter is kept so that
    its id cannot be reused while the map is in use."""
    owners: dict[int, tuple[nn.Parameter, list]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                owners.setdefault(id(param), (param, []))[1].append((module, attr))
    return owners


def _fill(model: nn.Module, name: str, value: torch.Tensor, owners: dict, assigned: dict) -> bool:
    """Put `value` into the parameter or persistent buffer `name`; False if the model has no such tensor.

    `assigned` (id -> tensor) holds what earlier calls put in place of meta tensors: a second name for the
    same tied parameter replaces it again rather than writing into the entry's tensor."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return False
    slot = module._parameters.get(attr, module._buffers.get(attr))
    if slot is None:
        return False
    if slot.shape != value.shape:
        raise ValueError(f"cache entry tensor {name}: shape {tuple(value.shape)}, the model's is {tuple(slot.shape)}")
    if not slot.is_meta and id(slot) not in assigned:
        with torch.no_grad():
            slot.copy_(value)
        return True
    real = value.detach().to(slot.dtype)
    if attr in module._buffers:
        module._buffers[attr] = assigned[id(real)] = real
        return True
    param = nn.Parameter(real, requires_grad=slot.requires_grad)
    holders = owners[id(slot)][1]
    for owner, key in holders:
        owner._parameters[key] = param
    owners[id(param)], assigned[id(param)] = (param, holders), param
    return True


@contextlib.contextmanager
def empty_parameters():
    """Build modules with every parameter on the meta device (no memory, no random init); buffers stay real.

    Buffers are small and computed by the modules themselves (rotary inv_freq, position ids), so they come out
    exactly as in an ordinary build. Parameters are registered on the CPU first (untouched `torch.empty`
    memory) and moved to meta at once, before any init runs on them (what accelerate's
    `init_empty_weights(include_buffers=False)` does).
    """
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def init_missing(model: nn.Module) -> list[str]:
    """Materialize every parameter or buffer still on the meta device and initialize it as transformers does
    (`model._init_weights` on its module): the fresh task head. Returns the names initialized.

    Tensors of the same module that are already real (loaded from the entry) keep their values. A tensor that
    `_init_weights` leaves alone would hold garbage: it is filled with NaN first, and any left is a ValueError.
    """
    owners = _parameter_owners(model)
    missing = [n for n, t in _named_tensors(model).items() if t.is_meta]
    for module_name in dict.fromkeys(n.rpartition(".")[0] for n in missing):
        _init_module(model, model.get_submodule(module_name), owners)
    now = _named_tensors(model)
    left = [n for n in missing if now[n].dtype.is_floating_point and bool(now[n].isnan().any())]
    if left:
        raise ValueError(f"{left[:5]}: not in the cache entry, and {type(model).__name__}._init_weights does not "
                         "initialize them")
    return missing


def _init_module(model: nn.Module, module: nn.Module, owners: dict) -> None:
    """Give `module`'s meta tensors NaN-filled CPU ones and run `model._init_weights(module)`.

    `_init_weights` initializes a module whole: tensors it already has (loaded from the entry, which other
    builds may share) are swapped for scratch copies meanwhile and put back after."""
    kept = []
    for slots in (module._parameters, module._buffers):
        for attr, t in list(slots.items()):
            if t is None:
                continue
            if not t.is_meta:
                kept.append((slots, attr, t))
                scratch = t.detach().clone()
                slots[attr] = nn.Parameter(scratch, requires_grad=False) if slots is module._parameters else scratch
            elif slots is module._buffers:
                slots[attr] = _nan_like(t)
            else:
                param = nn.Parameter(_nan_like(t), requires_grad=t.requires_grad)
                for owner, key in owners[id(t)][1]:
                    owner._parameters[key] = param
    with torch.no_grad():
        model._init_weights(module)
    for slots, attr, t in kept:
        slots[attr] = t


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def _nan_like(t: torch.Tensor) -> torch.Tensor:
    fill = float("nan") if t.dtype.is_floating_point else 0
    return torch.full(t.shape, fill, dtype=t.dtype, device="cpu")
