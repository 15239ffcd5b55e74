"""Properties of LoftQ per matrix (DESIGN.md, "LoftQ (per matrix)" and "LoftQ for QA-LoRA")."""

from __future__ import annotations

import math

import pytest
import torch

from workers.loftq import adapter_delta, loftq_init, randomized_svd
from workers.quant import QuantSpec, dequantize, quantize

SPECS = [QuantSpec("nf", 2, 64), QuantSpec("nf", 4, 64), QuantSpec("int", 2, 64), QuantSpec("int", 4, 64)]


def pretrained_like(out_f=256, in_f=512, seed=0):
    """A weight with a decaying spectrum plus noise, like a trained layer (not white noise)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(out_f, out_f, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(in_f, out_f, generator=gen)).Q
    s = 1.0 / (1 + torch.arange(out_f, dtype=torch.float32)) ** 0.7
    return (u * s) @ v.T + 0.002 * torch.randn(out_f, in_f, generator=gen)


def rel_error(w, res):
    approx = dequantize(res.quantized) + adapter_delta(
        res.lora_A, res.lora_B, res.scale, res.adapter, res.quantized.spec.group_size
    )
    return (torch.linalg.vector_norm(w - approx) / torch.linalg.vector_norm(w)).item()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_loftq_beats_plain_quantization_and_does_not_grow_with_iters(spec):
    w = pretrained_like()
    plain = (torch.linalg.vector_norm(w - dequantize(quantize(w, spec))) / torch.linalg.vector_norm(w)).item()
    finals = []
    for iters in range(1, 6):
        res = loftq_init(w, spec, rank=16, iters=iters)
        assert res.quant_error == pytest.approx(plain, rel=1e-6)
        assert res.error < plain
        assert rel_error(w, res) == pytest.approx(res.error, rel=1e-4)
        finals.append(res.error)
    assert all(b <= a for a, b in zip(finals, finals[1:], strict=False)), finals
    assert finals[-1] < finals[0]


@pytest.mark.parametrize("scale", [0.5, 2.0, 16.0])
def test_factors_are_divided_by_the_lora_scale(scale):
    w = pretrained_like(128, 256)
    ref = loftq_init(w, SPECS[0], rank=8, iters=2, scale=1.0)
    res = loftq_init(w, SPECS[0], rank=8, iters=2, scale=scale)
    assert torch.allclose(scale * res.lora_B @ res.lora_A, ref.lora_B @ ref.lora_A, atol=1e-5)
    assert torch.allclose(res.lora_A, ref.lora_A / math.sqrt(scale), atol=1e-6)
    assert rel_error(w, res) == pytest.approx(ref.error, rel=1e-4)


def test_rank_zero_is_plain_quantization():
    w = pretrained_like(128, 256)
    for spec in SPECS:
        res = loftq_init(w, spec, rank=0, iters=3)
        assert res.lora_A.shape == (0, 256) and res.lora_B.shape == (128, 0)
        assert torch.equal(res.quantized.codes(), quantize(w, spec).codes())
        assert res.errors == pytest.approx([res.quant_error] * 3)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
@pytest.mark.parametrize("iters", [1, 5])
def test_randomized_svd_within_one_percent_of_exact(spec, iters):
    w = pretrained_like(256, 512, seed=1)
    fast = loftq_init(w, spec, rank=16, iters=iters, svd="randomized")
    exact = loftq_init(w, spec, rank=16, iters=iters, svd="exact")
    assert fast.error <= exact.error * 1.01


def test_randomized_svd_recovers_a_low_rank_matrix():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(200, 8, generator=gen) @ torch.randn(8, 300, generator=gen)
    u, s, vh = randomized_svd(m, 8, generator=gen)
    assert torch.allclose((u * s) @ vh, m, atol=1e-3)
    assert torch.allclose(s, torch.linalg.svdvals(m)[:8], rtol=1e-4)


def test_qlora_baseline_has_zero_B_and_kaiming_A():
    w = pretrained_like(128, 256)
    res = loftq_init(w, SPECS[1], rank=16, iters=0)
    assert torch.equal(res.lora_B, torch.zeros(128, 16))
    assert res.lora_A.shape == (16, 256) and res.lora_A.abs().sum() > 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform_(a=sqrt(5)) on fan_in=256, as peft initializes A
    assert res.lora_A.abs().max() <= bound
    assert torch.equal(res.quantized.codes(), quantize(w, SPECS[1]).codes())
    assert res.errors == [] and res.error == res.quant_error


@pytest.mark.parametrize("spec", [QuantSpec("int", 2, 32), QuantSpec("int", 4, 64)], ids=lambda s: s.name)
def test_qalora_correction_is_constant_within_groups(spec):
    w = pretrained_like(128, 1024)
    res = loftq_init(w, spec, rank=8, iters=3, adapter="qalora", scale=2.0)
    L = spec.group_size
    assert res.lora_A.shape == (8, 1024 // L) and res.lora_B.shape == (128, 8)
    delta = adapter_delta(res.lora_A, res.lora_B, 2.0, "qalora", L).reshape(128, -1, L)
    assert torch.allclose(delta, delta[..., :1].expand_as(delta), atol=0)
    assert res.error < res.quant_error
    assert rel_error(w, res) == pytest.approx(res.error, rel=1e-4)


def test_qalora_correction_folds_exactly_into_zero_points():
    w = pretrained_like(64, 256)
    spec = QuantSpec("int", 4, 32, scale_dtype="float32")
    res = loftq_init(w, spec, rank=4, iters=2, adapter="qalora", scale=0.5)
    q = res.quantized
    merged_zeros = q.zeros + 0.5 * (res.lora_B @ res.lora_A) / 32
    merged = type(q)(q.packed, q.scales, merged_zeros, q.spec, q.shape)
    unmerged = dequantize(q) + adapter_delta(res.lora_A, res.lora_B, 0.5, "qalora", 32)
    assert torch.allclose(dequantize(merged), unmerged, atol=1e-6)


def test_qalora_is_no_worse_than_group_constant_optimum_of_one_step():
    """With iters=1 and exact SVD, the QA-LoRA correction is the rank-r optimum among group-constant ones."""
    w = pretrained_like(64, 128)
    spec = QuantSpec("int", 2, 16, scale_dtype="float32")
    res = loftq_init(w, spec, rank=64 // 8, iters=1, adapter="qalora", svd="exact")
    residual = w - dequantize(res.quantized)
    means = residual.reshape(64, -1, 16).mean(-1)
    full_rank = torch.linalg.vector_norm(residual - means.repeat_interleave(16, 1)) / torch.linalg.vector_norm(w)
    assert res.error >= full_rank.item() - 1e-6  # cannot beat the unconstrained group-constant fit


def test_deterministic_for_a_fixed_seed():
    w = pretrained_like(128, 256)
    a = loftq_init(w, SPECS[0], rank=8, iters=3, seed=7)
    b = loftq_init(w, SPECS[0], rank=8, iters=3, seed=7)
    assert torch.equal(a.lora_A, b.lora_A) and torch.equal(a.quantized.packed, b.quantized.packed)


def test_low_precision_input_runs_in_fp32():
    w = pretrained_like(128, 256)
    res = loftq_init(w.to(torch.bfloat16), SPECS[1], rank=8, iters=2)
    assert res.lora_A.dtype == torch.float32 and res.lora_B.dtype == torch.float32
    assert res.error < res.quant_error


@pytest.mark.gpu
def test_cuda_matches_cpu_bound():
    w = pretrained_like(256, 512).cuda()
    res = loftq_init(w, SPECS[0], rank=16, iters=3)
    assert res.lora_A.is_cuda and res.quantized.packed.is_cuda
    exact = loftq_init(w.cpu(), SPECS[0], rank=16, iters=3, svd="exact")
    assert res.error <= exact.error * 1.01


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=-1), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=10_000), "rank 10000 exceeds"),
        (dict(iters=-1), "iters"),
        (dict(iters=True), "iters"),
        (dict(scale=0.0), "scale"),
        (dict(scale=float("nan")), "scale"),
        (dict(svd="lanczos"), r"svd must be one of \['randomized', 'exact'\]"),
        (dict(adapter="dora"), "adapter"),
        (dict(adapter="qalora"), "needs kind 'int'"),
        (dict(spec="nf4"), "QuantSpec"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(kwargs, match):
    args = dict(weight=pretrained_like(64, 128), spec=SPECS[1], rank=4, iters=1) | kwargs
    with pytest.raises(ValueError, match=match):
        loftq_init(**args)


def test_group_size_that_does_not_divide_names_the_shape():
    with pytest.raises(ValueError, match=r"\(64, 96\).*group_size=64"):
        loftq_init(torch.randn(64, 96), SPECS[1], rank=4, iters=1)
