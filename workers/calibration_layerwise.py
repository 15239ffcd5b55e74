"""Calibration Gram matrices one decoder layer at a time, for a model that does not fit in memory whole.

GPTQ-style: the model is built on the meta device from its config (no memory). Only the token embedding (and the
rotary embedding's buffers) are materialized first; every batch of calibration texts (tokenized once, padded and
truncated exactly as `workers.calibration.gather_grams` does) runs through the model's own forward up to its first
decoder layer, which records what each layer is called with: the hidden states at the embedding output, and the
attention mask, position ids and rotary cos/sin that the model's own helpers built for it. The embedding then goes
back to meta. For each decoder layer in turn: its tensors are read from the weight files (one at a time, in the
dtype `from_pretrained(dtype="auto")` gives them, so the numbers are the whole-model path's), the same forward
pre-hooks as `gather_grams` (`GramHooks`: real tokens only, q/k/v and gate/up sharing one Gram) sit on its
targets, every batch's hidden states run through it, its outputs become the next layer's inputs, and the layer goes
back to meta. Layers after the last one with a target are not run.

Memory: at any time one decoder layer's weights, the hidden states of all samples (samples x tokens x hidden in the
model's dtype), one batch's transient activations inside the layer, and the Gram sums; never the whole model. For a
7B Llama (hidden 4096, MLP 11008, 32 layers, bf16): a layer is about 0.4 GB (4 x 4096^2 + 3 x 4096 x 11008
weights), the embedding 0.26 GB (only while the inputs are prepared), and 128 samples x 512 tokens of hidden
states 0.54 GB; the whole model would be 13.5 GB. The Gram matrices themselves are the result and both paths hold
them: in^2 float32 each, four distinct per 7B block (about 0.7 GB a block).

Supported: the Llama-family decoder layout (`model.model.layers`, a rotary embedding at the model level): llama,
mistral, qwen2 (SmolLM2 is llama). Any other model type is a ValueError that says to use the whole-model path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from workers.calibration import (
    DEFAULT_MAX_LENGTH,
    CalibrationGrams,
    GramHooks,
    calibration_fingerprint,
    tokenized_batches,
)
from workers.model_source import ModelSource

# model types whose decoder layers are called as layer(hidden_states, attention_mask=, position_ids=,
# position_embeddings=, ...) by a `model.model` with `embed_tokens`, `layers` and `rotary_emb` (checked)
LAYERWISE_MODEL_TYPES = ("llama", "mistral", "qwen2")
SAFETENSORS_FLOATS = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def supports_layerwise(config: dict) -> bool:
    """Whether a model config (config.json as a dict) has a decoder layout this module can run layer by layer."""
    return config.get("model_type") in LAYERWISE_MODEL_TYPES


def meta_model(source: ModelSource) -> nn.Module:
    """The model of `source` as its config names it (the class `architectures` names, as the whole-model path loads
    it, so module names match), on the meta device (no memory), in eval mode. ValueError for an unsupported type."""
    import transformers

    model_type = source.config.get("model_type")
    if not supports_layerwise(source.config):
        raise ValueError(f"calibration: model {source.name} is of type {model_type!r}; layer-by-layer gathering "
                         f"supports the Llama-family decoder layout ({', '.join(LAYERWISE_MODEL_TYPES)}): gather "
                         "its Gram matrices with the whole model loaded (workers.calibration.gather_grams)")
    config = transformers.AutoConfig.from_pretrained(source.path)
    with torch.device("meta"):
        return model_class(source)(config).eval()


def model_class(source: ModelSource) -> type:
    """The transformers class the model's config names (`architectures`), else AutoModel: the one both
    calibration paths build, so module names match the weight files."""
    import transformers

    architectures = source.config.get("architectures") or []
    found = getattr(transformers, architectures[0], None) if architectures else None
    return found or transformers.AutoModel


def gather_grams_layerwise(source: ModelSource, tokenizer, texts: Sequence[str], modules: Sequence[str], *,
                           max_length: int = DEFAULT_MAX_LENGTH, batch_size: int = 8,
                           on_layer: Callable[[int, int], None] | None = None,
                           on_grams: Callable[[dict[str, torch.Tensor]], None] | None = None,
                           model: nn.Module | None = None) -> CalibrationGrams:
    """The mean input Gram matrix of each named linear module of `source`'s model, as `gather_grams` returns them
    for the whole model, computed one decoder layer at a time (see the module docstring).

    `modules` are names from the model's `named_modules()` inside its decoder layers: a missing name is a KeyError
    naming it, one outside the decoder layers a ValueError. `on_layer(done, total)` is called after each layer run
    (total: up to the last layer with a target). `on_grams(grams)`, if given, receives each layer's finished Gram
    matrices as soon as the layer has run, and they are dropped here (at 7B shapes all of them are ~22 GB: the
    caller sends each layer's on, e.g. to Ray's object store); the result's `grams` then holds none. `model` is a
    skeleton from `meta_model(source)` to use (to observe
    it); by default one is built here. ValueError for a model type without the Llama-family layout."""
    model = (model if model is not None else meta_model(source)).eval()  # no dropout, as gather_grams
    base, layers, prefix = _decoder_layout(model, source)
    by_layer = _targets_by_layer(model, modules, prefix, len(layers))
    dtype = _weights_dtype(source, base.config)
    batches = list(tokenized_batches(tokenizer, texts, max_length, batch_size))
    masks = [batch["attention_mask"] for _, batch in batches]
    hidden, calls = _layer_inputs(model, base, layers, batches, source, dtype)
    found = dict(model.named_modules())
    hooks = GramHooks()
    handles = hooks.attach({name: found[name] for names in by_layer for name in names})
    total = max((i + 1 for i, names in enumerate(by_layer) if names), default=0)
    tokens = sum(int(mask.sum()) for mask in masks)
    try:
        for i in range(total):
            _run_layer(layers[i], f"{prefix}.{i}.", hidden, [call[i] for call in calls], masks, hooks, source, dtype)
            if on_grams is not None:
                on_grams(hooks.pop(by_layer[i], tokens))
            if on_layer is not None:
                on_layer(i + 1, total)
    finally:
        for handle in handles:
            handle.remove()
    return CalibrationGrams(hooks.grams(tokens), tokens, len(texts), calibration_fingerprint(texts, max_length))


def _decoder_layout(model: nn.Module, source: ModelSource) -> tuple[nn.Module, nn.ModuleList, str]:
    """(the decoder stack, its layers, the layers' module name): the Llama layout, or a ValueError saying what
    is missing."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    missing = [part for part, kind in (("layers", nn.ModuleList), ("embed_tokens", nn.Module),
                                       ("rotary_emb", nn.Module)) if not isinstance(getattr(base, part, None), kind)]
    if missing:
        raise ValueError(f"calibration: model {source.name} ({type(model).__name__}) lacks the Llama-family layout "
                         f"(no {', '.join(missing)}); gather its Gram matrices with the whole model loaded "
                         "(workers.calibration.gather_grams)")
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return base, layers, prefix


def _targets_by_layer(model: nn.Module, modules: Sequence[str], prefix: str, count: int) -> list[list[str]]:
    """The target names of each decoder layer, in order. KeyError for a name the model lacks (as gather_grams);
    ValueError for one outside the decoder layers."""
    found = dict(model.named_modules())
    missing = [name for name in modules if name not in found]
    if missing:
        raise KeyError(f"calibration: the model has no module {missing[0]!r}")
    by_layer: list[list[str]] = [[] for _ in range(count)]
    for name in modules:
        index, dot, _rest = name.removeprefix(prefix + ".").partition(".")
        if not name.startswith(prefix + ".") or not dot or not index.isdigit() or int(index) >= count:
            raise ValueError(f"calibration: module {name!r} is not inside a decoder layer ({prefix}.N.*); layer-by-"
                             "layer gathering only reaches those: use the whole-model path for it")
        by_layer[int(index)].append(name)
    return by_layer


def _weights_dtype(source: ModelSource, config) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` loads floating weights in: the config's, else the first floating
    tensor's in the files."""
    dtype = getattr(config, "dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((SAFETENSORS_FLOATS[t.dtype] for t in source.tensors.values() if t.dtype in SAFETENSORS_FLOATS),
                torch.get_default_dtype())


def _load(module: nn.Module, prefix: str, source: ModelSource, dtype: torch.dtype) -> None:
    """Give every parameter and persistent buffer of a meta `module` its tensor from the weight files (`prefix`:
    the module's name + '.'), floating ones in `dtype`; the tensors read become the module's own (no copy)."""
    state = {}
    for name in module.state_dict(keep_vars=True):
        tensor = source.read(_stored_name(prefix + name, source))
        state[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    module.load_state_dict(state, strict=True, assign=True)
    left = [name for name, t in [*module.named_parameters(), *module.named_buffers()] if t.device.type == "meta"]
    if left:
        raise ValueError(f"calibration: model {source.name}: {prefix}{left[0]} is not in the weight files and "
                         "cannot be built layer by layer; use the whole-model path")


def _stored_name(name: str, source: ModelSource) -> str:
    """The weight-file name of a model tensor: the same, or without / with the base model's 'model.' prefix (a
    checkpoint saved from another wrapper class)."""
    candidates = (name, name.removeprefix("model."), "model." + name)
    found = next((c for c in candidates if c in source.tensors), None)
    if found is None:
        raise ValueError(f"calibration: model {source.name} has no tensor {name!r} in its weight files")
    return found


class _LastLayerReachedError(Exception):
    """Raised from the last decoder layer's stand-in: what follows the layers (the final norm) is not needed."""


class _LayerCalls:
    """A stand-in for every decoder layer's forward in one batch: records each call's keyword arguments and passes
    the hidden states on; the last call raises with them."""

    def __init__(self, count: int):
        self.count, self.calls = count, []

    def __call__(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append(kwargs)
        if len(self.calls) == self.count:
            raise _LastLayerReachedError(hidden_states)
        return hidden_states


@torch.no_grad()
def _layer_inputs(model, base, layers, batches, source, dtype) -> tuple[list[torch.Tensor], list[list[dict]]]:
    """(hidden states at the embedding output, the keyword arguments each layer is called with) per batch.

    The model's own forward runs with stand-ins for its decoder layers' forward that record their arguments and
    pass the hidden states on: masks and rotary embeddings are built by the model's code, per layer (a layer type
    may have its own mask), exactly as in a whole-model forward. Only the embeddings are materialized, and only
    while this runs."""
    embed = base.embed_tokens
    _load(embed, _module_name(model, embed) + ".", source, dtype)
    rotary = base.rotary_emb
    base.rotary_emb = type(rotary)(config=base.config)  # its buffers computed from the config, not in the files
    hidden, calls = [], []
    try:
        for _, batch in batches:
            stand_in = _LayerCalls(len(layers))
            for layer in layers:
                layer.forward = stand_in  # an instance attribute: nn.Module.__call__ calls it instead
            try:
                base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            except _LastLayerReachedError as done:
                hidden.append(done.args[0])
            finally:
                for layer in layers:
                    del layer.forward
            if len(stand_in.calls) != len(layers):
                raise RuntimeError(f"calibration: model {source.name} called {len(stand_in.calls)} of its "
                                   f"{len(layers)} decoder layers")
            calls.append(stand_in.calls)
    finally:
        embed.to_empty(device="meta")  # freed: the layers never need it
    return hidden, calls


def _module_name(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


@torch.no_grad()
def _run_layer(layer: nn.Module, prefix: str, hidden: list[torch.Tensor], calls: list[dict],
               masks: list[torch.Tensor], hooks: GramHooks, source: ModelSource, dtype: torch.dtype) -> None:
    """Materialize one decoder layer, run every batch through it (its hooks summing Grams), replace each batch's
    hidden states by the layer's output, and free the layer."""
    _load(layer, prefix, source, dtype)
    try:
        for b, kwargs in enumerate(calls):
            hooks.start_batch(masks[b])
            out = layer(hidden[b], **kwargs)
            hidden[b] = out[0] if isinstance(out, tuple) else out  # older transformers returned a tuple
    finally:
        layer.to_empty(device="meta")
