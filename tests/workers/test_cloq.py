"""The calibrated initialization minimizes the output error on the calibration inputs: below LoftQ's, at the
optimum for its Q, LoftQ itself when the inputs are isotropic, plain quantization at rank 0."""

from __future__ import annotations

import pytest
import torch

from workers.cloq import calibrated_init, damped_cholesky
from workers.loftq import adapter_delta, loftq_init
from workers.quant import QuantSpec, dequantize

NF2 = QuantSpec("nf", 2, 16)


def layer(out_f: int = 48, in_f: int = 64, n: int = 512, seed: int = 0):
    """A weight and inputs whose features have very different scales (as real activations do)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    x = torch.randn(n, in_f, generator=gen) * torch.logspace(-1.5, 1, in_f)[torch.randperm(in_f, generator=gen)]
    return w, x


def output_error(weight: torch.Tensor, approx: torch.Tensor, inputs: torch.Tensor) -> float:
    """||(W - approx) X^T||_F / ||W X^T||_F for inputs X [n, in]: what the layer's outputs feel."""
    w = weight.float()
    return (torch.linalg.vector_norm((w - approx.float()) @ inputs.float().T)
            / torch.linalg.vector_norm(w @ inputs.float().T)).item()


def approx(result) -> torch.Tensor:
    return dequantize(result.quantized) + adapter_delta(result.lora_A, result.lora_B, result.scale)


@pytest.mark.parametrize("iters", [1, 3])
def test_the_output_error_is_below_loftqs(iters):
    w, x = layer()
    cloq = calibrated_init(w, x.T @ x, NF2, rank=8, iters=iters, damping=1e-6)
    loftq = loftq_init(w, NF2, rank=8, iters=iters, svd="exact")
    assert output_error(w, approx(cloq), x) < 0.85 * output_error(w, approx(loftq), x)


def test_for_its_q_the_correction_is_the_optimum():
    """No rank-2 correction of the same Q does better on the inputs: a direct optimization of the weighted
    objective from many starts ends at or above the closed form."""
    w, x = layer(out_f=8, in_f=16, n=64, seed=1)
    spec = QuantSpec("nf", 2, 8)
    result = calibrated_init(w, x.T @ x, spec, rank=2, iters=1, damping=0.0)
    q = dequantize(result.quantized)
    closed = output_error(w, approx(result), x)
    for seed in range(4):
        gen = torch.Generator().manual_seed(seed)
        b = torch.randn(8, 2, generator=gen).requires_grad_()
        a = torch.randn(2, 16, generator=gen).requires_grad_()
        opt = torch.optim.Adam([a, b], lr=0.02)
        for _ in range(3000):
            opt.zero_grad()
            loss = (((w - q - b @ a) @ x.T) ** 2).sum()
            loss.backward()
            opt.step()
        assert closed <= output_error(w, (q + b @ a).detach(), x) + 1e-4


def test_isotropic_inputs_give_loftq():
    w, _ = layer()
    cloq = calibrated_init(w, torch.eye(64), NF2, rank=8, iters=2, damping=0.0)
    loftq = loftq_init(w, NF2, rank=8, iters=2, svd="exact")
    assert torch.equal(cloq.quantized.packed, loftq.quantized.packed)
    torch.testing.assert_close(approx(cloq), approx(loftq), rtol=1e-4, atol=1e-4)


def test_rank_zero_is_plain_quantization():
    w, x = layer()
    result = calibrated_init(w, x.T @ x, NF2, rank=0, iters=1)
    from workers.quant import quantize

    assert torch.equal(result.quantized.packed, quantize(w, NF2).packed)
    assert result.lora_A.shape == (0, 64) and result.lora_B.shape == (48, 0)


def test_deterministic_and_scale_invariant():
    w, x = layer()
    one = calibrated_init(w, x.T @ x, NF2, rank=4, iters=2, svd="randomized", seed=3)
    two = calibrated_init(w, x.T @ x, NF2, rank=4, iters=2, svd="randomized", seed=3)
    assert torch.equal(one.lora_A, two.lora_A) and torch.equal(one.lora_B, two.lora_B)
    scaled = calibrated_init(w, x.T @ x, NF2, rank=4, iters=2, scale=2.0, svd="randomized", seed=3)
    torch.testing.assert_close(approx(scaled), approx(one), rtol=1e-4, atol=1e-4)  # s B A is what counts


def test_a_singular_gram_gets_more_damping_and_a_broken_one_is_an_error():
    w, x = layer()
    x[:, :10] = 0  # ten input features never active: X^T X is singular
    r, lam = damped_cholesky(x.T @ x, damping=0.0)
    assert lam > 0 and torch.isfinite(r).all()
    result = calibrated_init(w, x.T @ x, NF2, rank=4, iters=1, damping=0.0)
    assert torch.isfinite(result.lora_A).all() and torch.isfinite(result.lora_B).all()
    bad = x.T @ x
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        calibrated_init(w, bad, NF2, rank=4, iters=1)
    with pytest.raises(ValueError, match="expected \\[in, in\\]"):
        calibrated_init(w, torch.eye(32), NF2, rank=4, iters=1)


INT2 = QuantSpec("int", 2, 8)


def pooled_approx(result) -> torch.Tensor:
    return dequantize(result.quantized) + adapter_delta(result.lora_A, result.lora_B, result.scale, "qalora",
                                                        result.quantized.spec.group_size)


def test_the_pooled_qalora_step_beats_loftqs_and_keeps_qalora_shapes():
    w, x = layer()
    cloq = calibrated_init(w, x.T @ x, INT2, rank=4, iters=1, adapter="qalora", damping=1e-6, scale=2.0)
    loftq = loftq_init(w, INT2, rank=4, iters=1, svd="exact", adapter="qalora", scale=2.0)
    assert cloq.adapter == "qalora" and cloq.lora_A.shape == (4, 64 // 8) and cloq.lora_B.shape == (48, 4)
    assert torch.equal(cloq.quantized.codes(), loftq.quantized.codes())  # iters 1: the same Q, plain quantization
    assert output_error(w, pooled_approx(cloq), x) < output_error(w, pooled_approx(loftq), x)
    assert cloq.errors[0] == pytest.approx(output_error(w, pooled_approx(cloq), x), rel=1e-3)


def test_at_full_rank_the_pooled_step_is_the_weighted_least_squares_solution():
    """With every group as a rank, the best group-constant correction M G solves min ||(E - M G) X^T||: lstsq."""
    w, x = layer(out_f=12, in_f=32, n=256, seed=2)
    groups = 32 // 8
    result = calibrated_init(w, x.T @ x, INT2, rank=groups, iters=1, adapter="qalora", damping=0.0)
    residual = w - dequantize(result.quantized)
    pooled_inputs = x.reshape(256, groups, 8).sum(-1)  # X G^T: what the group-constant correction multiplies
    m = torch.linalg.lstsq(pooled_inputs.double(), (residual @ x.T).T.double()).solution.T.float()
    best = dequantize(result.quantized) + m.repeat_interleave(8, dim=1)
    assert output_error(w, pooled_approx(result), x) == pytest.approx(output_error(w, best, x), rel=1e-4)


def test_the_pooled_step_needs_int_and_a_rank_its_groups_hold():
    w, x = layer()
    with pytest.raises(ValueError, match="adapter='qalora': 'qalora' needs kind 'int'"):
        calibrated_init(w, x.T @ x, NF2, rank=4, iters=1, adapter="qalora")
    with pytest.raises(ValueError, match="rank 9 exceeds"):
        calibrated_init(w, x.T @ x, INT2, rank=9, iters=1, adapter="qalora")
