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

This module is the per-matrix math; gathering the Gram matrices from calibration data and `method: cloq` in
specs and builds are issue 16's remaining work.
"""

from __future__ import annotations

import math

import torch

from workers.loftq import LoftQResult, _result, check_args, truncated_svd
from workers.quant import QuantSpec, dequantize_codes, quantize_codes

DAMPING = 0.01
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
    damping: float = DAMPING,
    seed: int = 0,
) -> LoftQResult:
    """Quantize `weight` [out, in] and return Q plus the LoRA factors that minimize the output error on inputs
    whose Gram matrix is `gram` [in, in] (see the module docstring). Deterministic for a fixed `seed`."""
    check_args(weight, spec, rank, iters, scale, svd, "lora")  # LoftQ's argument rules, the same here
    if iters < 1:
        raise ValueError(f"calibrated_init: iters must be an integer >= 1 (0 is QLoRA: use loftq_init), got {iters}")
    if gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"calibrated_init: gram has shape {tuple(gram.shape)}, expected [in, in] = "
                         f"{(weight.shape[1], weight.shape[1])} for weight {tuple(weight.shape)}")
    w = weight.detach().float()
    R, _ = damped_cholesky(gram.to(w.device), damping)
    gen = torch.Generator(device=w.device).manual_seed(seed)
    w_norm = torch.linalg.vector_norm(w @ R.T).item() or 1.0
    codes, scales, zeros = quantize_codes(w, spec)
    quant_error = torch.linalg.vector_norm((w - dequantize_codes(codes, scales, zeros, spec)) @ R.T).item() / w_norm
    best, errors, delta = None, [], torch.zeros_like(w)
    for t in range(iters):
        if t > 0:
            codes, scales, zeros = quantize_codes(w - delta, spec)
        weighted = (w - dequantize_codes(codes, scales, zeros, spec)) @ R.T
        u, s, vh, _ = truncated_svd(weighted, rank, svd, None, gen)  # a cold start each time
        error = math.sqrt(max(weighted.norm().item() ** 2 - (s.double() ** 2).sum().item(), 0.0)) / w_norm
        errors.append(error)
        root = torch.sqrt(s)
        # A = sqrt(S) Vh R^-T: solve R A^T = (sqrt(S) Vh)^T rather than invert R
        a = torch.linalg.solve_triangular(R, (root[:, None] * vh).T, upper=True).T
        b = u * root
        if best is None or error < best[-1]:
            best = (codes, scales, zeros, a / math.sqrt(scale), b / math.sqrt(scale), error)
        delta = b @ a
    codes, scales, zeros, A, B, _ = best
    return _result(codes, scales, zeros, spec, A, B, errors, quant_error, scale, "lora")
