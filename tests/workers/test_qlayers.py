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


def test_bf16_forward_dequantizes_once_into_the_input_dtype():
    """bf16 training (DeepSpeed casts parameters only): the base is the exact fp32 dequantization rounded once."""
    layer, _ = layer_from_loftq(QuantSpec("nf", 2, 32, "float16"))
    with torch.no_grad():  # a trained adapter, so both branches of the output matter
        layer.lora_B.add_(torch.randn_like(layer.lora_B) * 0.05)
    x = torch.randn(3, 5, 128)
    want = layer(x)
    for p in layer.parameters():  # what deepspeed's bf16 mode does to the module
        p.data = p.data.to(torch.bfloat16)
    assert layer.qscales.dtype == torch.float16
    assert torch.equal(layer.dequantized_weight(torch.bfloat16), dequantize(layer.quantized).to(torch.bfloat16))
    got = layer(x.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits: relative error of a 128-term dot product stays within a few 2^-8
    assert ((got.float() - want).norm() / want.norm()).item() < 1e-2


def test_module_casts_move_the_packed_base_but_keep_its_dtype():
    layer, _ = layer_from_loftq(QuantSpec("int", 4, 32, "float16"))
    before = {name: buf.clone() for name, buf in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.lora_A.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    for name, buf in layer.named_buffers():  # codes, fp16 scales and zero points: untouched, not rounded to bf16
        assert buf.dtype == before[name].dtype and torch.equal(buf, before[name])
    layer.float()
    assert layer.lora_A.dtype == torch.float32 and layer.qscales.dtype == torch.float16


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), 1e8])
def test_merge_refuses_a_non_finite_result_and_leaves_the_layer_unmerged(poison):
    """A NaN / inf adapter, or a fold beyond fp16 zero points (1e8 in B overflows 65504), is refused."""
    layer, _ = layer_from_loftq(QuantSpec("int", 4, 32, "float16"), adapter="qalora")
    zeros = layer.qzeros.clone()
    with torch.no_grad():
        layer.lora_B[0, 0] = poison
        if poison == 1e8:
            layer.lora_A.fill_(1.0)
    with pytest.raises(ValueError, match="non-finite zero points"):
        layer.merge()
    assert not layer.merged and torch.equal(layer.qzeros, zeros)


def test_the_layer_names_its_rank_alpha_and_adapter_params_as_peft_and_torchtune_do():
    layer, _ = layer_from_loftq(QuantSpec("nf", 4, 32), rank=4, scale=2.0)
    assert layer.r == 4 and layer.alpha == 8.0
    assert layer.adapter_params() == [layer.lora_A, layer.lora_B]
    assert {id(p) for p in layer.adapter_params()} == {id(p) for p in layer.parameters() if p.requires_grad}
