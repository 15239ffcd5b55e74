"""The quantized LoRA / QA-LoRA layer: forward, merge into zero points, gradients."""

from __future__ import annotations

import pytest
import torch

from workers.loftq import loftq_init
from workers.qlayers import QuantLoraLinear
from workers.quant import QuantSpec, dequantize, quantize


def layer_from_loftq(spec, adapter="lora", rank=4, scale=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 128, generator=gen) * 0.05
    res = loftq_init(w, spec, rank=rank, iters=2, scale=scale, adapter=adapter)
    layer = QuantLoraLinear(res.quantized, torch.randn(48, generator=gen), rank=rank, scale=scale, adapter=adapter)
    layer.set_adapter(res.lora_A, res.lora_B)
    return layer, w


def test_lora_forward_equals_dequantized_plus_low_rank():
    layer, _ = layer_from_loftq(QuantSpec("nf", 4, 32))
    x = torch.randn(3, 5, 128)
    weight = dequantize(layer.quantized) + 2.0 * layer.lora_B @ layer.lora_A
    assert torch.allclose(layer(x), x @ weight.T + layer.bias, atol=1e-5)


def test_qalora_forward_pools_the_adapter_input():
    layer, _ = layer_from_loftq(QuantSpec("int", 4, 32), adapter="qalora")
    assert layer.lora_A.shape == (4, 128 // 32)
    x = torch.randn(7, 128)
    pooled = x.reshape(7, 4, 32).mean(-1)
    want = x @ dequantize(layer.quantized).T + layer.bias + 2.0 * pooled @ layer.lora_A.T @ layer.lora_B.T
    assert torch.allclose(layer(x), want, atol=1e-5)
    assert torch.allclose(layer(x), x @ (dequantize(layer.quantized) + layer.delta_weight()).T + layer.bias, atol=1e-5)


@pytest.mark.parametrize("scale_dtype,atol", [("float32", 1e-5), ("float16", 2e-3)])
def test_qalora_merge_is_exact_and_keeps_codes_and_scales(scale_dtype, atol):
    layer, _ = layer_from_loftq(QuantSpec("int", 2, 32, scale_dtype), adapter="qalora")
    with torch.no_grad():  # a trained adapter, not just the LoftQ start
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.01)
    x = torch.randn(6, 128)
    before = layer(x)
    codes, scales, zeros = layer.qcodes.clone(), layer.qscales.clone(), layer.qzeros.clone()
    layer.merge()
    assert layer.merged and torch.equal(layer.qcodes, codes) and torch.equal(layer.qscales, scales)
    assert layer.qzeros.dtype == zeros.dtype and not torch.equal(layer.qzeros, zeros)
    # the merged layer is a plain quantized layer: its dequantized weight alone gives the adapted output
    assert torch.allclose(x @ dequantize(layer.quantized).T + layer.bias, before, atol=atol)
    assert torch.allclose(layer(x), before, atol=atol)
    layer.unmerge()
    assert torch.equal(layer.qzeros, zeros) and torch.allclose(layer(x), before, atol=1e-6)


def test_merge_refuses_plain_lora():
    layer, _ = layer_from_loftq(QuantSpec("nf", 4, 32))
    with pytest.raises(ValueError, match="QA-LoRA"):
        layer.merge()


def test_only_the_adapter_is_trainable():
    layer, _ = layer_from_loftq(QuantSpec("nf", 2, 32))
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert {n for n, _ in layer.named_buffers()} == {"qcodes", "qscales"}
    layer(torch.randn(4, 128)).sum().backward()
    assert layer.lora_A.grad is not None and layer.lora_B.grad.abs().sum() > 0


def test_set_adapter_checks_shapes():
    q = quantize(torch.randn(16, 64), QuantSpec("nf", 4, 32))
    layer = QuantLoraLinear(q, rank=4)
    with pytest.raises(ValueError, match="do not match"):
        layer.set_adapter(torch.zeros(4, 32), torch.zeros(16, 4))
