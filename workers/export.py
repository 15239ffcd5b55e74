"""Export a fine-tuned model: PEFT adapters, a merged full-precision model, or a merged QA-LoRA model.

- `export_peft_adapter`: `adapter_config.json` + `adapter_model.safetensors` written by peft itself (we load
  our A, B and task head into a peft wrapper of the dequantized model and let it save), so `peft` loads them
  over the dequantized base and gives the same logits as our quantized model.
- `merged_fp_model`: the plain LoRA merge, dequant(Q) + s * B @ A as ordinary nn.Linear weights, which
  `save_pretrained` writes in Hugging Face format.
- `export_qalora_merged`: QA-LoRA folds into the INT zero points, so the result is still a quantized model
  with the same codes and scales: written as safetensors in the cache entry's own tensor layout.
Every export writes `loftune.json` beside it with the base's cache key, so a result can be traced to its base.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from workers.entry_format import qweight_tensors
from workers.qlayers import LORA_LAYERS, QuantLoraLinear

PROVENANCE_FILE = "loftune.json"


def quant_layers(model: nn.Module) -> dict[str, QuantLoraLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)}


def merged_fp_model(model: nn.Module, with_adapter: bool = True) -> nn.Module:
    """A copy of `model` whose quantized layers are plain nn.Linear: dequant(Q) (+ the adapter's delta)."""
    merged = copy.deepcopy(model)
    for name, layer in quant_layers(merged).items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        weight = layer.dequantized_weight(torch.float32)
        if with_adapter and layer.rank and not layer.merged:
            weight = weight + layer.delta_weight()
        with torch.no_grad():
            linear.weight.copy_(weight)
            if layer.bias is not None:
                linear.bias.copy_(layer.bias.float())
        merged.set_submodule(name, linear)
    return merged


def write_provenance(out_dir: str, provenance: dict) -> None:
    """loftune.json in `out_dir`: where an export came from (base key, trial, metric)."""
    with open(os.path.join(out_dir, PROVENANCE_FILE), "w") as f:
        json.dump(provenance, f, indent=1)


def export_peft_adapter(model: nn.Module, out_dir: str, *, task_type: str, provenance: dict,
                        trainable_modules: list[str] | None = None) -> str:
    """Write the LoRA adapters (and a trained task head) in PEFT's format; returns `out_dir`.

    `task_type` is PEFT's ("SEQ_CLS", "CAUSAL_LM"); `trainable_modules` are full-precision modules trained
    alongside (the task head), saved through PEFT's `modules_to_save`.
    """
    from peft import LoraConfig, get_peft_model

    layers = quant_layers(model)
    if not layers:
        raise ValueError("export_peft_adapter: the model has no quantized LoRA layers")
    kinds = {layer.adapter for layer in layers.values()}
    if kinds != {"lora"}:
        raise ValueError("export_peft_adapter: QA-LoRA adapters pool their input, which PEFT cannot express; "
                         "use export_qalora_merged")
    first = next(iter(layers.values()))
    heads = list(trainable_modules or [])
    # peft extends modules_to_save in place (SEQ_CLS adds "classifier", "score"): give it its own list
    config = LoraConfig(r=first.rank, lora_alpha=first.scale * first.rank, target_modules=sorted(layers),
                        lora_dropout=0.0, bias="none", task_type=task_type, modules_to_save=list(heads) or None)
    peft_model = get_peft_model(merged_fp_model(model, with_adapter=False), config)
    with torch.no_grad():
        for name, layer in layers.items():
            target = peft_model.base_model.model.get_submodule(name)
            target.lora_A["default"].weight.copy_(layer.lora_A.float())
            target.lora_B["default"].weight.copy_(layer.lora_B.float())
        for name in heads:
            wrapper = peft_model.base_model.model.get_submodule(name)
            wrapper.modules_to_save["default"].load_state_dict(model.get_submodule(name).state_dict())
    os.makedirs(out_dir, exist_ok=True)
    # the adapters never touch the embeddings: no need for peft to look the base up (on the hub) to decide
    peft_model.save_pretrained(out_dir, safe_serialization=True, save_embedding_layers=False)
    write_provenance(out_dir, provenance)
    return out_dir


def export_qalora_merged(model: nn.Module, out_dir: str, *, model_config: dict, provenance: dict) -> str:
    """Merge every QA-LoRA adapter into its zero points and write the still-quantized model."""
    tensors: dict[str, torch.Tensor] = {}
    layers = quant_layers(model)
    for name, layer in layers.items():
        layer.merge()
        tensors.update(qweight_tensors(name, {k: v.contiguous() for k, v in layer.quantized.state_dict().items()}))
    skip = tuple(f"{name}." for name in layers)
    for key, value in model.state_dict().items():
        if not key.startswith(skip) or key.endswith(".bias"):
            tensors.setdefault(key, value.contiguous())
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(model_config, f, indent=1)
    write_provenance(out_dir, {**provenance, "format": "loftune-quantized", "merged": "qalora"})
    return out_dir
