"""The driver's part of a calibrated build (method cloq): each target layer's input Gram matrix, once.

The full-precision model runs over the calibration texts a single time on the driver (no gradients, the dtype its
files have; whole, or one decoder layer at a time: see Memory) and `workers.calibration.gather_grams` sums x^T x
at every target. Each distinct Gram matrix goes into the Ray object store once (q/k/v share theirs), and the build
actors receive it with the weight. The manifest records where the texts came from, how many tokens they had and
their fingerprint (also part of the key).

Memory: a model whose full-precision weights fit in half the memory the machine has available (MemAvailable in
/proc/meminfo) is loaded whole, once (a 7B model in bf16 is about 13.5 GB); a larger one runs layer by layer
(`workers.calibration_layerwise`: one decoder layer's weights plus the calibration samples' hidden states, about
0.4 + 0.5 GB at 7B shapes with 128 x 512 tokens), and so does any model when LOFTUNE_CALIBRATE_LAYERWISE=1
(LOFTUNE_CALIBRATE_LAYERWISE=0 keeps the whole model whatever its size). Both give the same Gram matrices. These
take in^2 float32 each (four per Llama block: 3 x 4096^2 + 11008^2 floats, about 0.7 GB; the object store spills
to disk). Each calibrated build gathers them again (one pass over the texts) rather than keeping a 7B model's
~22 GB in the driver through the rest of the run.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from dataclasses import replace

import ray
import torch
from tqdm import tqdm

from orchestrator.build_request import BuildRequest
from workers.calibration import CalibrationGrams, gather_grams
from workers.calibration_layerwise import (
    LAYERWISE_MODEL_TYPES,
    gather_grams_layerwise,
    model_class,
    supports_layerwise,
)
from workers.model_source import ModelSource

LAYERWISE_ENV = "LOFTUNE_CALIBRATE_LAYERWISE"  # "1": always layer by layer, "0": never; unset: by the model's size
# bytes per element of the safetensors dtypes (others count 4: an estimate that errs towards layer by layer)
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def load_full_precision_model(source: ModelSource) -> torch.nn.Module:
    """The model of `source` as its config names it (so module names match the weight files), in eval mode."""
    return model_class(source).from_pretrained(source.path, dtype="auto").eval()


def gather_build_grams(request: BuildRequest, modules: list[str], progress: bool,
                       on_grams: Callable[[dict[str, torch.Tensor]], None] | None = None) -> CalibrationGrams:
    """Run the request's model over its calibration texts and return each target module's input Gram matrix:
    the whole model at once, or layer by layer where `calibrate_layerwise` says so (the same Grams).

    With `on_grams`, the Grams are handed to it as they are finished (layer by layer, or all at once) and the
    result holds none (its counts and fingerprint only): the driver never holds a 7B model's ~22 GB of them."""
    import transformers

    data, source = request.calibration, request.source
    layerwise = calibrate_layerwise(source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.path)
    bar = tqdm(total=None if layerwise else len(data.texts), desc=f"calibrate {source.name}",
               unit="layer" if layerwise else "text", disable=not progress, file=sys.stderr)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    try:
        if layerwise:
            return gather_grams_layerwise(source, tokenizer, data.texts, modules, max_length=data.max_length,
                                          on_layer=advance, on_grams=on_grams)
        grams = gather_grams(load_full_precision_model(source), tokenizer, data.texts, modules,
                             max_length=data.max_length, on_batch=advance)
        if on_grams is None:
            return grams
        on_grams(grams.grams)
        return replace(grams, grams={})
    finally:
        bar.close()


def calibrate_layerwise(source: ModelSource) -> bool:
    """Whether calibration runs `source`'s model layer by layer: LOFTUNE_CALIBRATE_LAYERWISE=1 says yes (an
    unsupported model type is then a ValueError naming it), =0 no; otherwise yes when the model's layout allows it
    and its full-precision weights exceed half the memory available now."""
    forced = os.environ.get(LAYERWISE_ENV, "").strip()
    if forced == "1" and not supports_layerwise(source.config):
        raise ValueError(f"{LAYERWISE_ENV}=1: model {source.name} is of type {source.config.get('model_type')!r}, "
                         f"which calibration cannot run layer by layer (it runs {', '.join(LAYERWISE_MODEL_TYPES)}); "
                         f"unset {LAYERWISE_ENV} to load the whole model")
    if forced in ("0", "1"):
        return forced == "1"
    budget = available_memory()
    return budget is not None and supports_layerwise(source.config) and weights_bytes(source) > budget // 2


def weights_bytes(source: ModelSource) -> int:
    """The bytes of every tensor in the model's weight files (as stored: what loading them whole takes)."""
    return sum(math.prod(info.shape) * DTYPE_BYTES.get(info.dtype, 4) for info in source.tensors.values())


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (what can be allocated without swapping); None where unreadable."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the figure is in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def put_grams(grams: dict[str, torch.Tensor]) -> dict[str, ray.ObjectRef]:
    """One object-store entry per distinct Gram matrix; modules that share one share its ref."""
    by_tensor: dict[int, ray.ObjectRef] = {}
    refs = {}
    for module, gram in grams.items():
        if id(gram) not in by_tensor:
            by_tensor[id(gram)] = ray.put(gram)
        refs[module] = by_tensor[id(gram)]
    return refs


def calibration_record(request: BuildRequest, grams: CalibrationGrams | None) -> dict:
    """The manifest's `calibration` field: {} for an uncalibrated build."""
    if grams is None:
        return {}
    data = request.calibration
    role = "weights the low-rank step (in the key)" if request.calibrated else "scores output_error only (not in " \
        "the key: an entry built without it has no output_error)"
    metric = "output_error (and a calibrated method's errors): ||(W - Q - BA) R^T|| / ||W R^T||, R^T R = X^T X + lambda"
    return {"calibration": {"origin": data.origin, "samples": grams.samples, "tokens": grams.tokens,
                            "max_length": data.max_length, "fingerprint": grams.fingerprint, "damping": data.damping,
                            "role": role, "error_metric": metric}}
