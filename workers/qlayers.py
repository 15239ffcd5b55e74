"""The quantized linear layer with a LoRA (or QA-LoRA) adapter.

The frozen base is kept packed (uint8 codes + scales + zero points, registered as buffers so that
DeepSpeed ZeRO-3 never partitions them) and dequantized on the fly: `QuantMatmul` dequantizes into a
transient in forward and again in backward, so between the two autograd keeps only references to the
packed buffers, never a weight-sized tensor (the adapter branch keeps its input, as any LoRA does). On the
CPU that transient lives in one per-thread buffer that every layer reuses. The adapter (a `LoraAdapter` of
workers/lora_adapter.py, which both layers here own) is ordinary autograd:

    lora:    y = W~ x + b + s * B @ A @ dropout(x)                 A: [r, in]
    qalora:  y = W~ x + b + s * B @ A @ pool_L(dropout(x))          A: [r, in / L]

where pool_L averages x over the quantization groups of L inputs, s = alpha / r. `FullPrecisionLoraLinear` is the
full-precision control (`bits: 16`): the same LoRA over a frozen bf16 weight instead of packed codes.

Mixed precision: the base is dequantized straight into the input's dtype (one rounding of the exact fp32
values, e.g. to bf16), and the packed buffers keep their stored dtype whatever the module is cast to
(`.to(torch.bfloat16)` moves them between devices but does not round fp16 / fp32 scales and zero points to
bf16). DeepSpeed's bf16 mode casts only parameters: the adapters and the bias.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from workers.loftq import ADAPTERS, group_fold
from workers.lora_adapter import LoraAdapter, load_factors
from workers.quant import QuantizedTensor, QuantSpec, dequantize

_WORKSPACE = threading.local()


def _transient_weight(q: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight for one matmul, valid until the next call on this thread.

    On the CPU every layer writes it into one per-thread buffer sized for the largest layer seen: a fresh
    weight-sized tensor costs page faults that took longer than the dequantization itself (bench_dequant.py:
    4096x11008 NF4 to bf16, about 40 ms fresh against 15 ms reused). The training peak already counts one
    transient weight, so this adds nothing to it. Other devices reuse memory through their caching allocator.
    """
    if q.packed.device.type != "cpu":
        return dequantize(q, dtype)
    nbytes = q.shape[0] * q.shape[1] * dtype.itemsize
    buffer = getattr(_WORKSPACE, "buffer", None)
    if buffer is None or buffer.numel() < nbytes:
        _WORKSPACE.buffer = None  # free the smaller one first: never two alive at once
        buffer = _WORKSPACE.buffer = torch.empty(nbytes, dtype=torch.uint8)
    return dequantize(q, dtype, out=buffer[:nbytes].view(dtype).view(q.shape))


class QuantMatmul(torch.autograd.Function):
    """y = x @ dequant(Q)^T + b, with no gradient for Q: backward dequantizes again rather than keep W~."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, spec, shape, bias):
        """Dequantize into a transient in x's dtype, multiply, and keep only the packed buffers."""
        weight = _transient_weight(QuantizedTensor(packed, scales, zeros, spec, shape), x.dtype)
        ctx.spec, ctx.shape, ctx.dtype, ctx.has_bias = spec, shape, x.dtype, bias is not None
        ctx.save_for_backward(packed, scales, zeros)  # the module's buffers themselves, not copies
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y):
        """grad_x = grad_y @ W~ from a second dequantization; None for the packed buffers."""
        packed, scales, zeros = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            q = QuantizedTensor(packed, scales, zeros, ctx.spec, ctx.shape)
            # a double backward (create_graph) would keep the weight in its graph: give it its own copy
            weight = dequantize(q, ctx.dtype) if torch.is_grad_enabled() else _transient_weight(q, ctx.dtype)
            grad_x = grad_y.to(ctx.dtype) @ weight
        if ctx.has_bias and ctx.needs_input_grad[6]:  # the bias is frozen in loftune; honour a caller's choice
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, None, None, None, grad_bias


def quant_linear(x: torch.Tensor, quantized: QuantizedTensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantize(quantized, x.dtype), bias) that keeps no dequantized weight for backward."""
    return QuantMatmul.apply(x, quantized.packed, quantized.scales, quantized.zeros, quantized.spec,
                             quantized.shape, bias)


def _frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    """A layer's own frozen copy of `bias` (a parameter, so that DeepSpeed's bf16 mode casts it with the adapter)."""
    return nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None


def _dropout(p: float) -> nn.Module:
    """The adapter input's dropout; an Identity at 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _apply_keeping_buffer_dtypes(module: nn.Module, apply: Callable, fn, recurse: bool) -> nn.Module:
    """`module._apply` (through `apply`, the nn.Module one) where the frozen base buffers follow device moves only,
    never dtype casts (see the module docstring)."""
    stored = {name: buf for name, buf in module._buffers.items() if buf is not None}
    apply(fn, recurse)
    for name, before in stored.items():
        after = module._buffers[name]
        if after.dtype != before.dtype:
            module._buffers[name] = before.to(after.device)
    return module


class QuantLoraLinear(nn.Module):
    """A frozen quantized [out, in] weight plus a trainable low-rank adapter (`LoraAdapter`)."""

    def __init__(
        self,
        quantized: QuantizedTensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        scale: float = 1.0,
        adapter: str = "lora",
        dropout: float = 0.0,
    ):
        super().__init__()
        if adapter not in ADAPTERS:
            raise ValueError(f"adapter: expected 'lora' or 'qalora', got {adapter!r}")
        self.spec: QuantSpec = quantized.spec
        self.out_features, self.in_features = quantized.shape
        self.register_buffer("qcodes", quantized.packed)
        self.register_buffer("qscales", quantized.scales)
        self.register_buffer("qzeros", quantized.zeros)
        self.bias = _frozen_bias(bias)
        self.lora = LoraAdapter(adapter, rank, scale, self.spec.group_size)
        self.lora_A, self.lora_B = self.lora.new_factors(self.out_features, self.in_features)
        self.dropout = _dropout(dropout)
        self.merged = False
        self._zeros_before_merge: torch.Tensor | None = None
        self._held: torch.Tensor | None = None  # a dequantized weight kept across forwards: see `weights_held`

    @property
    def adapter(self) -> str:
        """'lora' or 'qalora'."""
        return self.lora.kind

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def r(self) -> int:
        """The adapter's rank, by peft's name."""
        return self.lora.rank

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.lora.scale

    @property
    def alpha(self) -> float:
        """peft's lora_alpha: scale = alpha / r."""
        return self.lora.alpha

    def adapter_params(self) -> list[nn.Parameter]:
        """The parameters that train (as torchtune's LoRA layers name them): A and B, never the frozen base."""
        return [self.lora_A, self.lora_B]

    def set_adapter(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Load adapter factors (e.g. LoftQ's), checking their shapes."""
        load_factors(self.lora_A, self.lora_B, lora_A, lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The [out, in] correction the adapter adds to the base weight (float32)."""
        return self.lora.delta(self.lora_A, self.lora_B)

    @property
    def quantized(self) -> QuantizedTensor:
        return QuantizedTensor(self.qcodes, self.qscales, self.qzeros, self.spec,
                               (self.out_features, self.in_features))

    def _apply(self, fn, recurse=True):
        return _apply_keeping_buffer_dtypes(self, super()._apply, fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight dequantized as `dtype` (a fresh tensor; the layer never keeps one)."""
        return dequantize(self.quantized, dtype)

    def merge(self) -> None:
        """QA-LoRA: fold the adapter into the zero points; the layer is then a plain INT-k layer, same codes.

        beta'[o, g] = beta[o, g] + s * (B @ A)[o, g] / L, exact up to the zero points' dtype.
        """
        if self.adapter != "qalora" or self.spec.kind != "int":
            raise ValueError("merge: only a QA-LoRA adapter on an INT base folds into the quantized weight; "
                             "for LoRA export a merged full-precision model instead")
        if self.merged:
            return
        fold = group_fold(self.lora_A.detach(), self.lora_B.detach(), self.scale, self.spec.group_size)
        merged = (self.qzeros.float() + fold).to(self.qzeros.dtype)
        if not torch.isfinite(merged).all():  # a NaN / inf adapter, or zero points beyond their dtype (fp16)
            raise ValueError(f"merge: folding the adapter gives non-finite zero points (in {self.qzeros.dtype}); "
                             "the layer is left unmerged")
        self._zeros_before_merge, self.qzeros = self.qzeros, merged
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge` exactly (the original zero points were kept)."""
        if self.merged:
            self.qzeros = self._zeros_before_merge
            self._zeros_before_merge, self.merged = None, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        held = self._held
        if held is not None and held.dtype == x.dtype and not torch.is_grad_enabled():
            y = F.linear(x, held, bias)  # the same values quant_linear would dequantize again
        else:
            y = quant_linear(x, self.quantized, bias)
        if self.rank == 0 or self.merged:
            return y
        return y + self.lora.branch(self.dropout(x), self.lora_A, self.lora_B)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, quant={self.spec.name}, "
                f"adapter={self.adapter}, rank={self.rank}, scale={self.scale}")


class FrozenMatmul(torch.autograd.Function):
    """y = x @ W^T + b for a frozen W stored in another dtype than x (bf16 under fp32 training): cast into a
    transient in forward and again in backward, so that autograd keeps W itself, never a cast copy of it."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight)  # the module's buffer itself
        return F.linear(x, weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_y):
        (weight,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight.to(grad_y.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, grad_bias


def frozen_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight.to(x.dtype), bias) with no gradient for `weight` and no cast copy kept for backward."""
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)  # autograd keeps `weight` itself: nothing to save
    return FrozenMatmul.apply(x, weight, bias)


class FullPrecisionLoraLinear(nn.Module):
    """The full-precision control (`bits: 16`): plain LoRA over a frozen, unquantized (bf16) [out, in] weight.

        y = W x + b + s * B @ A @ dropout(x)          A: [r, in] Kaiming-uniform, B = 0 (QLoRA's init)

    It owns the same `LoraAdapter` as QuantLoraLinear and answers to the same names (lora_A / lora_B, r, alpha,
    adapter_params, set_adapter, delta_weight, dequantized_weight, merged), and it is registered as a virtual
    QuantLoraLinear, so build_model's trainable set and the exports find it like the others. Its base is the
    `weight` buffer, in the dtype it was given: like packed buffers it follows device moves, not dtype casts, so
    fp32 training keeps the bf16 weight and casts it per matmul (`frozen_linear`). It has no QuantSpec (`spec` is
    None), no quantized base, nothing to merge into (export a merged full-precision model instead) and nothing for
    `weights_held` to hold.
    """

    spec = None
    merged = False  # nothing ever folds into the full-precision weight

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        *,
        rank: int = 0,
        scale: float = 1.0,
        adapter: str = "lora",
        dropout: float = 0.0,
    ):
        super().__init__()
        if adapter != "lora":
            raise ValueError(f"adapter: a full-precision (bits 16) layer takes plain 'lora' (QA-LoRA pools over "
                             f"quantization groups, which it has none of), got {adapter!r}")
        if weight.ndim != 2:
            raise ValueError(f"weight: expected an [out, in] matrix, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach())  # frozen, and never copied (e.g. an object-store view)
        self.bias = _frozen_bias(bias)
        self.lora = LoraAdapter(adapter, rank, scale)
        self.lora_A, self.lora_B = self.lora.new_factors(self.out_features, self.in_features)
        self.dropout = _dropout(dropout)

    @property
    def adapter(self) -> str:
        """Always 'lora'."""
        return self.lora.kind

    @property
    def rank(self) -> int:
        return self.lora.rank

    @property
    def scale(self) -> float:
        """s = alpha / r."""
        return self.lora.scale

    def adapter_params(self) -> list[nn.Parameter]:
        """The parameters that train: A and B, never the frozen weight."""
        return [self.lora_A, self.lora_B]

    def set_adapter(self, lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
        """Load adapter factors, checking their shapes."""
        load_factors(self.lora_A, self.lora_B, lora_A, lora_B)

    def delta_weight(self) -> torch.Tensor:
        """The [out, in] correction the adapter adds to the weight (float32)."""
        return self.lora.delta(self.lora_A, self.lora_B)

    def _apply(self, fn, recurse=True):
        return _apply_keeping_buffer_dtypes(self, super()._apply, fn, recurse)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The base weight as `dtype` (a fresh tensor), by the name every LoRA layer of loftune answers to."""
        return self.weight.to(dtype, copy=True)

    def merge(self) -> None:
        raise ValueError("merge: a full-precision LoRA adapter does not fold into a quantized weight; "
                         "export a merged full-precision model instead")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = frozen_linear(x, self.weight, bias)
        if self.rank == 0:
            return y
        return y + self.lora.branch(self.dropout(x), self.lora_A, self.lora_B)

    def extra_repr(self) -> str:
        dtype = str(self.weight.dtype).removeprefix("torch.")
        return (f"in={self.in_features}, out={self.out_features}, weight={dtype}, adapter={self.adapter}, "
                f"rank={self.rank}, scale={self.scale}")


# loftune's LoRA layers: what build_model's trainable set and the exports look for. The two share the adapter
# (`LoraAdapter`) by composition, not by inheritance.
LORA_LAYERS = (QuantLoraLinear, FullPrecisionLoraLinear)


HOLD_BUDGET_BYTES = 2 << 30  # dequantized weights `weights_held` may keep at once (the rest dequantize per call)


@contextmanager
def weights_held(model: nn.Module, dtype: torch.dtype, budget_bytes: int = HOLD_BUDGET_BYTES) -> Iterator[int]:
    """Within the block, quantized layers keep their dequantized weight (in `dtype`) while the total fits
    `budget_bytes`, and forwards without gradients use it.

    Generation runs a forward per token, and each would dequantize every layer again: a generate call inside
    this block dequantizes each held layer once. Outputs are unchanged (the same values, the same matmul).
    Yields how many layers are held; they are released on exit.
    """
    held, used = [], 0
    try:
        with torch.no_grad():
            for module in model.modules():
                if not isinstance(module, QuantLoraLinear):
                    continue  # a full-precision layer holds its weight already
                nbytes = module.out_features * module.in_features * dtype.itemsize
                if used + nbytes <= budget_bytes:
                    module._held = module.dequantized_weight(dtype)
                    held.append(module)
                    used += nbytes
        yield len(held)
    finally:
        for module in held:
            module._held = None
