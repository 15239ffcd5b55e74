"""The quantized base matmul in training: gradients equal the dequantized reference's, nothing weight-sized is
kept between forward and backward, and DeepSpeed ZeRO 0-3 (one gloo process on the CPU) agrees."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from workers.qlayers import QuantLoraLinear
from workers.quant import QuantSpec, quantize

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# fp32: both sides run the same matmuls, so only summation order may differ. bf16: a few bf16 ulps (2^-8)
# of the largest entry.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2**-6}


def make_layer(spec, out_f, in_f, *, adapter="lora", rank=4, bias=True, seed=0) -> QuantLoraLinear:
    """A layer over a random quantized weight with a trained-looking adapter (B != 0, so both paths matter)."""
    gen = torch.Generator().manual_seed(seed)
    q = quantize(torch.randn(out_f, in_f, generator=gen) * 0.05, spec)
    b = torch.randn(out_f, generator=gen) * 0.1 if bias else None
    layer = QuantLoraLinear(q, b, rank=rank, scale=2.0, adapter=adapter)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    return layer


class Reference(nn.Module):
    """nn.Linear over the dequantized weight plus the same adapter: what QuantLoraLinear must behave like."""

    def __init__(self, layer: QuantLoraLinear, dtype: torch.dtype):
        super().__init__()
        self.linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=dtype)
        self.linear.weight = nn.Parameter(layer.dequantized_weight(dtype), requires_grad=False)
        if layer.bias is not None:
            self.linear.bias = nn.Parameter(layer.bias.detach().to(dtype).clone(), requires_grad=False)
        self.lora_A = nn.Parameter(layer.lora_A.detach().to(dtype).clone())
        self.lora_B = nn.Parameter(layer.lora_B.detach().to(dtype).clone())
        self.scale, self.adapter, self.group = layer.scale, layer.adapter, layer.spec.group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(*x.shape[:-1], -1, self.group).mean(-1) if self.adapter == "qalora" else x
        return self.linear(x) + self.scale * F.linear(F.linear(h, self.lora_A), self.lora_B)


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert got.dtype == want.dtype, what
    err = (got.float() - want.float()).abs().max().item()
    assert err <= TOLERANCE[dtype] * want.float().abs().max().item(), f"{what}: max error {err}"


@pytest.mark.parametrize("spec,adapter", [(QuantSpec("nf", 4, 64), "lora"), (QuantSpec("nf", 2, 32), "lora"),
                                          (QuantSpec("int", 3, 32), "lora"), (QuantSpec("int", 4, 32), "qalora")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_gradients_equal_the_dequantized_reference(spec, adapter, dtype, bias):
    layer = make_layer(spec, 96, 256, adapter=adapter, bias=bias).to(dtype)
    ref = Reference(layer, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 256, generator=gen).to(dtype)
    upstream = torch.randn(3, 5, 96, generator=gen).to(dtype)  # a generic dL/dy, not just ones
    grads = []
    for module in (layer, ref):
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        (y * upstream).sum().backward()
        grads.append({"y": y.detach(), "x": xi.grad, "lora_A": module.lora_A.grad, "lora_B": module.lora_B.grad})
    for name in grads[1]:
        assert_close(grads[0][name], grads[1][name], dtype, name)
    assert layer.bias is None or layer.bias.grad is None  # the base bias stays frozen


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_stack_shares_the_transient_weight_without_mixing_layers(dtype):
    """Layers of different sizes reuse one transient-weight buffer: each backward must see its own weight."""
    spec = QuantSpec("nf", 4, 32)
    layers = [make_layer(spec, 160, 64, seed=0), make_layer(spec, 96, 160, seed=1), make_layer(spec, 32, 96, seed=2)]
    stack = nn.Sequential(*[layer.to(dtype) for layer in layers])
    ref = nn.Sequential(*[Reference(layer, dtype) for layer in layers])
    x = torch.randn(6, 64).to(dtype)
    grads = []
    for module in (stack, ref):
        xi = x.clone().requires_grad_(True)
        module(xi).float().square().sum().backward()
        grads.append([xi.grad] + [p.grad for n, p in module.named_parameters() if "lora" in n])
    for i, (got, want) in enumerate(zip(*grads, strict=True)):
        assert_close(got, want, dtype, f"gradient {i}")


def test_double_backward_equals_the_reference():
    """create_graph keeps the backward's weight in the graph, so that one must not be the shared buffer."""
    spec = QuantSpec("nf", 4, 32)
    layers = [make_layer(spec, 96, 64, seed=0), make_layer(spec, 64, 96, seed=1)]
    grads = []
    for module in (nn.Sequential(*layers), nn.Sequential(*[Reference(layer, torch.float32) for layer in layers])):
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        (gx,) = torch.autograd.grad(module(x).square().sum(), x, create_graph=True)
        gx.square().sum().backward()  # a gradient penalty: differentiates through the first backward
        grads.append([p.grad for n, p in module.named_parameters() if "lora" in n])
    for i, (got, want) in enumerate(zip(*grads, strict=True)):
        assert_close(got, want, torch.float32, f"gradient {i}")


def saved_by_autograd(fn):
    """Run fn() and return every tensor autograd saved for backward during it."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


def storage_ptrs(module: nn.Module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in [*module.buffers(), *module.parameters()]}


@pytest.mark.parametrize("spec,adapter", [(QuantSpec("nf", 4, 64), "lora"), (QuantSpec("nf", 2, 64), "lora"),
                                          (QuantSpec("int", 4, 32), "qalora")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_weight_sized_tensor_is_kept_for_backward(spec, adapter, dtype):
    """A 2-layer stack of 1024x1024 layers, 256 tokens: autograd keeps activations and references, no weight."""
    stack = nn.Sequential(make_layer(spec, 1024, 1024, adapter=adapter, rank=16, seed=0),
                          make_layer(spec, 1024, 1024, adapter=adapter, rank=16, seed=1)).to(dtype)
    x = torch.randn(4, 64, 1024, dtype=dtype, requires_grad=True)  # a middle layer: its input needs a grad
    y, saved = saved_by_autograd(lambda: stack(x))
    weight_numel = 1024 * 1024
    assert saved and max(t.numel() for t in saved) < weight_numel, sorted(t.numel() for t in saved)[-3:]
    # the packed codes are kept by reference: the module's own storage, not a copy
    packed = [t for t in saved if t.dtype == torch.uint8]
    assert len(packed) == 2 and all(t.untyped_storage().data_ptr() in storage_ptrs(stack) for t in packed)
    # everything else is activation-sized: the adapter branch's inputs, as in any LoRA
    copies = [t for t in saved if t.untyped_storage().data_ptr() not in storage_ptrs(stack)]
    assert sum(t.numel() for t in copies) <= 2.1 * x.numel()
    y.float().square().mean().backward()  # and backward still runs from what was kept
    assert all(layer.lora_A.grad is not None for layer in stack)


def test_the_saved_tensor_count_catches_a_kept_weight():
    """The check above is not vacuous: F.linear over a dequantized weight (the old forward) trips it."""
    layer = make_layer(QuantSpec("nf", 4, 64), 1024, 1024, rank=16)
    x = torch.randn(4, 64, 1024, requires_grad=True)
    weight = layer.dequantized_weight()  # frozen, as the old forward's was; x's gradient still needs it
    _, saved = saved_by_autograd(lambda: F.linear(x, weight))
    assert max(t.numel() for t in saved) >= 1024 * 1024


# ------------------------------------------------------------------------------------------- DeepSpeed


class Stack(nn.Module):
    """Two quantized layers with a nonlinearity between them, returning a scalar loss."""

    def __init__(self, first: nn.Module, second: nn.Module):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.second(F.gelu(self.first(x))).float() - target).square().mean()


def adapter_grads(model: nn.Module, read) -> dict[str, torch.Tensor]:
    return {n: read(p).float().clone() for n, p in model.named_parameters() if n.endswith(("lora_A", "lora_B"))}


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_adapter_gradients_under_deepspeed_equal_the_reference(process_group, zero_stage, precision):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    spec = QuantSpec("nf", 4, 64)
    first, second = make_layer(spec, 192, 128, rank=8, seed=0), make_layer(spec, 64, 192, rank=8, seed=1)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    reference = Stack(Reference(first, dtype), Reference(second, dtype))
    gen = torch.Generator().manual_seed(2)
    x, target = torch.randn(4, 16, 128, generator=gen), torch.randn(4, 16, 64, generator=gen)
    reference(x.to(dtype), target).backward()

    model = Stack(first, second)
    config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": zero_stage}, "zero_allow_untested_optimizer": True,
              "bf16": {"enabled": precision == "bf16"}, "steps_per_print": 1 << 30}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    engine.backward(engine(x.to(dtype), target))

    got = adapter_grads(engine.module, safe_get_full_grad)
    want = adapter_grads(reference, lambda p: p.grad)
    assert got.keys() == want.keys() and len(got) == 4
    for name, grad in got.items():
        assert grad.abs().max() > 0, name
        assert_close(grad, want[name], dtype, f"{name} at ZeRO-{zero_stage} {precision}")
