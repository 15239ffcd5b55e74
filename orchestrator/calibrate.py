"""The driver's part of a calibrated build (method cloq): each target layer's input Gram matrix, once.

The full-precision model runs over the calibration texts a single time on the driver (no gradients, the dtype its
files have) and `workers.calibration.gather_grams` sums x^T x at every target. Each distinct Gram matrix goes into
the Ray object store once (q/k/v share theirs), and the build actors receive it with the weight. The manifest
records where the texts came from, how many tokens they had and their fingerprint (also part of the key).

Memory: the model is held once (a 7B model in bf16 is about 13.5 GB) and the Gram matrices take in^2 float32
each (four per Llama block: 3 x 4096^2 + 11008^2 floats, about 0.7 GB; the object store spills to disk). Each
calibrated build gathers them again (one forward pass over the texts) rather than keeping a 7B model's ~22 GB in
the driver through the rest of the run.
"""

from __future__ import annotations

import sys

import ray
import torch
from tqdm import tqdm

from orchestrator.build_request import BuildRequest
from workers.calibration import CalibrationGrams, gather_grams
from workers.model_source import ModelSource


def load_full_precision_model(source: ModelSource) -> torch.nn.Module:
    """The model of `source` as its config names it (so module names match the weight files), in eval mode."""
    import transformers

    architectures = source.config.get("architectures") or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    model_class = model_class or transformers.AutoModel
    return model_class.from_pretrained(source.path, dtype="auto").eval()


def gather_build_grams(request: BuildRequest, modules: list[str], progress: bool) -> CalibrationGrams:
    """Run the request's model over its calibration texts and return each target module's input Gram matrix."""
    import transformers

    data = request.calibration
    model = load_full_precision_model(request.source)
    tokenizer = transformers.AutoTokenizer.from_pretrained(request.source.path)
    bar = tqdm(total=len(data.texts), desc=f"calibrate {request.source.name}", unit="text", disable=not progress,
               file=sys.stderr)
    try:
        return gather_grams(model, tokenizer, data.texts, modules, max_length=data.max_length,
                            on_batch=lambda done, _total: bar.update(done - bar.n))
    finally:
        bar.close()


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
    return {"calibration": {"origin": data.origin, "samples": grams.samples, "tokens": grams.tokens,
                            "max_length": data.max_length, "fingerprint": grams.fingerprint, "damping": data.damping,
                            "error_metric": "output: ||(W - Q - BA) R^T|| / ||W R^T||, R^T R = X^T X + damping"}}
