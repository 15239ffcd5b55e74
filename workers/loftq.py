"""LoftQ: quantize a weight jointly with a rank-r LoRA correction, per matrix.

The loop (DESIGN.md, "LoftQ (per matrix)"), with s = alpha / r the LoRA scale:

    A, B = 0
    for t in 1..T:
        Q = dequant(quant(W - s * B @ A))
        U, S, Vh = svd_r(W - Q)
        B = U * sqrt(S) / sqrt(s);  A = sqrt(S)[:, None] * Vh / sqrt(s)

so Q + s * B @ A is Q plus the best rank-r approximation of W - Q. T = 0 is the QLoRA start:
Q = quant(W), A random (Kaiming uniform, as peft), B = 0.

The QA-LoRA variant (`adapter="qalora"`) pools the adapter input over the quantization groups, so its
correction s * B @ A / L is constant within each group of L inputs, A: [r, in / L]. The best such
correction is the rank-r SVD of the group means of W - Q; the alternation is otherwise the same.

All math is float32 on the weight's device. The returned factors are those of the best iterate, so the
final error never grows with T (the alternation is not guaranteed monotone: each Q has its own scales).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from workers.quant import QuantizedTensor, QuantSpec, check_groupable, dequantize_codes, quantize_codes
from workers.quant_codes import pack_codes
from workers.quant_plan import max_rank, method_problem

SVD_METHODS = ("randomized", "exact")
ADAPTERS = ("lora", "qalora")


@dataclass
class LoftQResult:
    """A quantized base and the LoRA factors that start fine-tuning from it."""

    quantized: QuantizedTensor
    lora_A: torch.Tensor  # [rank, in] (lora) or [rank, in / group_size] (qalora)
    lora_B: torch.Tensor  # [out, rank]
    errors: list[float] = field(default_factory=list)  # ||W - Q - s*dW||_F / ||W||_F after each iteration
    quant_error: float = 0.0  # ||W - quant(W)||_F / ||W||_F, the QLoRA starting error
    scale: float = 1.0
    adapter: str = "lora"

    @property
    def error(self) -> float:
        """Relative error of the returned (best) iterate; the plain quantization error when iters == 0."""
        return min(self.errors) if self.errors else self.quant_error


@dataclass
class _Iterate:
    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    A: torch.Tensor
    B: torch.Tensor
    error: float


def randomized_svd(
    m: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 2,
    start: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncated SVD of `m` by a randomized range finder (Halko et al. 2011).

    `start` ([in, k] or [k, in]-transposed right singular vectors of a nearby matrix) warm-starts the
    range finder: in LoftQ the residual moves little between iterations, so the previous subspace plus a
    few random directions captures the new one with fewer power iterations. Cost O(out * in * rank).
    """
    out_f, in_f = m.shape
    k = min(rank + oversample, out_f, in_f)
    omega = torch.randn(in_f, k, device=m.device, dtype=m.dtype, generator=generator)
    if start is not None and start.numel():
        n = min(start.shape[1], k)
        omega[:, :n] = start[:, :n]
    basis = torch.linalg.qr(m @ omega).Q
    for _ in range(power_iters):
        basis = torch.linalg.qr(m.T @ basis).Q
        basis = torch.linalg.qr(m @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.T @ m, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def exact_svd(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-`rank` truncation of the full SVD: O(out * in * min(out, in))."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def group_mean(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in / group_size]: the mean over each group of inputs."""
    return m.reshape(m.shape[0], -1, group_size).mean(dim=-1)


def expand_groups(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in / group_size] -> [out, in]: each value repeated over its group."""
    return m.repeat_interleave(group_size, dim=1)


def group_fold(A: torch.Tensor, B: torch.Tensor, scale: float, group_size: int) -> torch.Tensor:
    """QA-LoRA's correction per weight of each group, [out, in / L]: s * B @ A / L (float32). Added to the INT
    zero points, it merges the adapter exactly (the adapter sees the group mean of its input)."""
    return scale * (B.float() @ A.float()) / group_size


def adapter_delta(
    A: torch.Tensor, B: torch.Tensor, scale: float, adapter: str = "lora", group_size: int = 1
) -> torch.Tensor:
    """The full [out, in] weight correction an adapter adds: s*B@A (lora) or expand(s*B@A/L) (qalora).

    The one formula for a merged weight, an export and QA-LoRA's zero-point fold (`group_fold`)."""
    if adapter == "qalora":
        return expand_groups(group_fold(A, B, scale, group_size), group_size)
    return scale * (B.float() @ A.float())


def check_args(weight: torch.Tensor, spec: QuantSpec, rank: int, iters: int, scale: float, svd: str,
                adapter: str) -> None:
    """ValueError naming the argument, for every input a per-matrix initialization (LoftQ, cloq) takes."""
    if not isinstance(spec, QuantSpec):
        raise ValueError(f"loftq_init: spec must be a QuantSpec, got {type(spec).__name__}")
    check_groupable(tuple(weight.shape), spec.group_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"loftq_init: rank must be an integer >= 0, got {rank!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"loftq_init: iters must be an integer >= 0, got {iters!r}")
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"loftq_init: scale must be a finite number > 0, got {scale!r}")
    if svd not in SVD_METHODS:
        raise ValueError(f"loftq_init: svd must be one of {list(SVD_METHODS)}, got {svd!r}")
    if adapter not in ADAPTERS:
        raise ValueError(f"loftq_init: adapter must be one of {list(ADAPTERS)}, got {adapter!r}")
    problem = method_problem(adapter, spec.kind)  # the rule the spec and the build check, by method
    if problem:
        raise ValueError(f"loftq_init: adapter={adapter!r}: {problem}")
    largest = max_rank(tuple(weight.shape), spec.group_size, pooled=adapter == "qalora")
    if rank > largest:
        raise ValueError(f"loftq_init: rank {rank} exceeds min(out, adapter in) = {largest} for shape "
                         f"{tuple(weight.shape)}")


def loftq_init(
    weight: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    iters: int,
    scale: float = 1.0,
    svd: str = "randomized",
    *,
    adapter: str = "lora",
    seed: int = 0,
) -> LoftQResult:
    """Quantize `weight` [out, in] with LoftQ and return Q plus LoRA factors (see the module docstring).

    `scale` is the LoRA scale alpha / r used at training time; the factors are divided by sqrt(scale)
    so that Q + scale * B @ A is the intended approximation. Deterministic for a fixed `seed`.
    """
    check_args(weight, spec, rank, iters, scale, svd, adapter)
    w = weight.detach().float()
    out_f, in_f = w.shape
    gen = torch.Generator(device=w.device).manual_seed(seed)
    L = spec.group_size if adapter == "qalora" else 1
    w_norm = torch.linalg.vector_norm(w).item() or 1.0

    # Large fresh tensors cost page faults that rival the arithmetic: reuse three buffers throughout.
    shifted, residual, delta = torch.empty_like(w), torch.empty_like(w), torch.empty_like(w)
    codes, scales, zeros = quantize_codes(w, spec)
    torch.sub(w, dequantize_codes(codes, scales, zeros, spec, out=residual), out=residual)
    quant_error = torch.linalg.vector_norm(residual).item() / w_norm
    a_cols = in_f // L
    if iters == 0:
        A, B = _qlora_factors(out_f, a_cols, rank, w.device, gen)
        return _result(codes, scales, zeros, spec, A, B, [], quant_error, scale, adapter)

    best: _Iterate | None = None
    errors: list[float] = []
    start = None
    for t in range(iters):
        if t > 0:  # iteration 0 quantizes W itself: that is the plain quantization above
            codes, scales, zeros = quantize_codes(torch.sub(w, delta, out=shifted), spec)
            torch.sub(w, dequantize_codes(codes, scales, zeros, spec, out=residual), out=residual)
        # QA-LoRA: the best group-constant correction is the SVD of the group means, scaled by
        # sqrt(L) so that Frobenius norms of the [out, in/L] problem match the [out, in] one.
        target = group_mean(residual, L) * math.sqrt(L) if L > 1 else residual
        u, s, vh, start = truncated_svd(target, rank, svd, start, gen)
        # The correction is an orthogonal projection of the residual (onto rank-r, group-constant
        # matrices), so ||R - correction||^2 = ||R||^2 - sum(s^2) exactly, without forming it.
        error_sq = torch.linalg.vector_norm(residual).item() ** 2 - (s.double() ** 2).sum().item()
        error = math.sqrt(max(error_sq, 0.0)) / w_norm
        errors.append(error)
        if best is None or error < best.error:
            root = torch.sqrt(s)
            # s*B@A must equal low_rank (lora), or sqrt(L)*low_rank (qalora: delta = expand(s*B@A)/L).
            factor = math.sqrt(math.sqrt(L) / scale)
            best = _Iterate(codes, scales, zeros, (root[:, None] * vh) * factor, (u * root) * factor, error)
        if t + 1 < iters and L == 1:
            torch.matmul(u * s, vh, out=delta)
        elif t + 1 < iters:
            delta = expand_groups((u * s) @ vh / math.sqrt(L), L)
    return _result(best.codes, best.scales, best.zeros, spec, best.A, best.B, errors, quant_error, scale, adapter)


def _qlora_factors(out_f: int, a_cols: int, rank: int, device: torch.device, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The QLoRA start (T = 0): A Kaiming-uniform from `gen`, as peft initializes it, and B = 0."""
    A = torch.empty(rank, a_cols, device=device)
    torch.nn.init.kaiming_uniform_(A, a=math.sqrt(5), generator=gen)
    return A, torch.zeros(out_f, rank, device=device)


def truncated_svd(target: torch.Tensor, rank: int, svd: str, start: torch.Tensor | None, gen: torch.Generator
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(u, s, vh) of `target`'s rank-`rank` SVD by the `svd` method ("randomized" starts from `start`, the
    previous iterate's right singular vectors, when given), and the warm start for the next iteration."""
    if rank == 0:
        return target[:, :0], target.new_zeros(0), target[:0], start
    if svd == "exact":
        return (*exact_svd(target, rank), start)
    # a cold start needs more power iterations on the flat spectrum of a quantization residual
    u, s, vh = randomized_svd(target, rank, power_iters=4 if start is None else 2, start=start, generator=gen)
    return u, s, vh, vh.T


def _result(codes, scales, zeros, spec, A, B, errors, quant_error, scale, adapter) -> LoftQResult:
    shape = (codes.shape[0], codes.shape[1])
    quantized = QuantizedTensor(pack_codes(codes, spec.bits), scales, zeros, spec, shape)
    return LoftQResult(quantized, A.contiguous(), B.contiguous(), errors, quant_error, scale, adapter)
