"""Calibrated initialization: LoftQ's alternation, with the low-rank step weighted by real input activations.

LoftQ minimizes the weight error ||W - Q - sBA||_F. What the network feels is the output error on the layer's
inputs X [n, in]: ||(W - Q - sBA) X^T||_F. With H = X^T X + lambda I = R^T R (R upper triangular, a Cholesky
factor), ||E X^T||_F^2 = tr(E H E^T) = ||E R^T||_F^2, so for a given Q the best rank-r correction is the
Eckart-Young solution in the weighted space, mapped back (DESIGN.md, "Calibrated initialization"):

    A, B = 0
    for t in 1..T:
        Q = dequant(quant(W - s * B @ A))
        U, S, Vh = svd_r((W - Q) R^T)
        B = U sqrt(S) / sqrt(s);  A = sqrt(S) Vh R^-T / sqrt(s)

lambda is `damping` x mean(diag(X^T X)), multiplied by 10 until the Cholesky factorization succeeds; a Gram
matrix that is not finite is an error. With X = I (and no damping) this is LoftQ. As in CLoQ (Deng et al.
2025) the quantization step itself is the plain one. The returned factors are the best iterate's by the
weighted error, and `errors` are weighted relative errors ||(W - Q - sBA) R^T|| / ||W R^T||.

QA-LoRA's pooled adapter (`adapter="qalora"`, method qalora-cloq) has a group-constant correction; its weighted
step is a reduced-rank regression (`WeightedStep`). This module is the per-matrix math: the Gram matrices come
from workers/calibration.py, gathered by the build's driver (orchestrator/calibrate.py).
"""

from __future__ import annotations

import math

import torch

from workers.loftq import LoftQResult, _result, check_args, truncated_svd
from workers.quant import QuantSpec, dequantize_codes, quantize_codes

# lambda = DAMPING x mean(diag(X^T X)): with 1 the objective weighs the inputs' directions and all directions
# (LoftQ's weight error) alike. Smaller values fit the calibration activations of the full-precision model more
# closely, and the errors compound through the quantized network: on SmolLM2 at NF2 the merged model's loss on
# held-out problems at the start of fine-tuning was 19.9 at 0.01, 14.2 at 0.1, 8.0 at 0.3, 7.5 at 1, 8.0 at 3
# and 8.7 at 10, against LoftQ's 12.3 and the bf16 model's 2.6 (BENCHMARKS.md section 9).
DAMPING = 1.0
MAX_DAMPING_TRIES = 8


def damped_cholesky(gram: torch.Tensor, damping: float = DAMPING) -> tuple[torch.Tensor, float]:
    """(R, lambda) with R upper triangular and R^T R = gram + lambda I; lambda starts at damping x mean(diag)
    and grows tenfold until the factorization succeeds. ValueError for a gram that is not finite or square."""
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"calibration: the Gram matrix must be square [in, in], got shape {tuple(gram.shape)}")
    h = gram.detach().float()
    if not torch.isfinite(h).all():
        raise ValueError("calibration: the Gram matrix X^T X holds NaN or inf values (non-finite activations)")
    h = (h + h.T) / 2  # accumulated sums drift from symmetry by rounding
    base = h.diagonal().mean().item()
    lam = damping * base if base > 0 else max(damping, 1e-6)
    eye = torch.eye(h.shape[0], device=h.device)
    for _ in range(MAX_DAMPING_TRIES):
        lower, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0 and torch.isfinite(lower).all():
            return lower.T.contiguous(), lam
        lam = lam * 10 if lam > 0 else 1e-6
    raise ValueError(f"calibration: the Gram matrix is not positive definite even with damping {lam:.3g}")


def calibrated_init(
    weight: torch.Tensor,
    gram: torch.Tensor,
    spec: QuantSpec,
    rank: int,
    iters: int,
    scale: float = 1.0,
    svd: str = "exact",
    *,
    adapter: str = "lora",
    damping: float = DAMPING,
    seed: int = 0,
) -> LoftQResult:
    """Quantize `weight` [out, in] and return Q plus the LoRA factors that minimize the output error on inputs
    whose Gram matrix is `gram` [in, in] (see the module docstring); `adapter="qalora"` gives QA-LoRA's pooled
    factors (A [r, in / group_size]). Deterministic for a fixed `seed`."""
    check_args(weight, spec, rank, iters, scale, svd, adapter)  # LoftQ's argument rules, the same here
    if iters < 1:
        raise ValueError(f"calibrated_init: iters must be an integer >= 1 (0 is QLoRA: use loftq_init), got {iters}")
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"calibrated_init: gram has shape {tuple(gram.shape)}, expected [in, in] = "
                         f"{(weight.shape[1], weight.shape[1])} for weight {tuple(weight.shape)}")
    w = weight.detach().float()
    step = WeightedStep(gram.to(w.device), spec.group_size if adapter == "qalora" else 1, damping)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    w_norm = step.norm(w) or 1.0
    quant_error = None
    best, errors, delta = None, [], torch.zeros_like(w)
    for t in range(iters):
        # iteration 0 quantizes W itself: its weighted residual is also the plain quantization's error
        codes, scales, zeros = quantize_codes(w - delta if t else w, spec)
        target, residual_norm = step.target(w - dequantize_codes(codes, scales, zeros, spec))
        quant_error = residual_norm / w_norm if quant_error is None else quant_error
        u, s, vh, _ = truncated_svd(target, rank, svd, None, gen)  # a cold start each time
        error = math.sqrt(max(residual_norm ** 2 - (s.double() ** 2).sum().item(), 0.0)) / w_norm
        errors.append(error)
        a, b = step.factors(u, s, vh)
        if best is None or error < best[-1]:
            # s * B @ A must equal b @ a (lora), or L * (b @ a) (qalora: delta = expand(s * B @ A / L))
            factor = math.sqrt(step.group_size / scale)
            best = (codes, scales, zeros, a * factor, b * factor, error)
        delta = step.delta(a, b)
    codes, scales, zeros, A, B, _ = best
    return _result(codes, scales, zeros, spec, A, B, errors, quant_error, scale, adapter)


class WeightedStep:
    """The best rank-r correction of a residual E in the output-error norm ||E R^T|| (H + lambda I = R^T R).

    Plain LoRA: SVD_r(E R^T), mapped back through R^-T. QA-LoRA's correction is group-constant, M G with G the
    [in / L, in] group indicator: a reduced-rank regression. Its least-squares M is E H G^T (G H G^T)^-1, and the
    best rank-r M is SVD_r(M Rg^T) Rg^-T with Rg^T Rg = G H G^T; the error is ||E R^T||^2 minus the kept
    singular values squared in both cases (the rest is orthogonal to what the step can reach)."""

    def __init__(self, gram: torch.Tensor, group_size: int, damping: float):
        self.r, lam = damped_cholesky(gram, damping)
        self.group_size = group_size
        if group_size > 1:
            damped = self.r.T @ self.r  # H + lambda I, as factorized
            self.h_gt = _group_sum(damped, group_size)  # H G^T [in, in / L]
            self.h_g = _group_sum(self.h_gt.T.contiguous(), group_size)  # G H G^T [in / L, in / L]
            self.r_g = torch.linalg.cholesky(self.h_g, upper=True)

    def norm(self, m: torch.Tensor) -> float:
        """||m R^T||_F."""
        return torch.linalg.vector_norm(m @ self.r.T).item()

    def target(self, residual: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(the matrix whose rank-r SVD is the step: E R^T, or M_ls Rg^T; and ||E R^T||), one [in, in] product
        each: at 7B shapes that product is the cost of an iteration."""
        weighted = residual @ self.r.T
        norm = torch.linalg.vector_norm(weighted).item()
        if self.group_size == 1:
            return weighted, norm
        least_squares = torch.linalg.solve(self.h_g, (residual @ self.h_gt).T).T  # E H G^T (G H G^T)^-1
        return least_squares @ self.r_g.T, norm

    def factors(self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with b @ a the step's correction (lora) or its group values M (qalora)."""
        root = torch.sqrt(s)
        r = self.r if self.group_size == 1 else self.r_g
        # a = sqrt(S) Vh R^-T: solve R a^T = (sqrt(S) Vh)^T rather than invert R
        return torch.linalg.solve_triangular(r, (root[:, None] * vh).T, upper=True).T, u * root

    def delta(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The [out, in] correction of the weight."""
        low_rank = b @ a
        return low_rank if self.group_size == 1 else low_rank.repeat_interleave(self.group_size, dim=1)


def _group_sum(m: torch.Tensor, group_size: int) -> torch.Tensor:
    """[rows, in] -> [rows, in / L]: the sum over each group of columns (m G^T)."""
    return m.reshape(m.shape[0], -1, group_size).sum(dim=-1)
