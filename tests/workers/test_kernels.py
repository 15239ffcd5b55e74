"""The Triton dequantization kernel against `workers.quant.dequantize`, bit for bit.

On the CPU the kernel runs under TRITON_INTERPRET=1 (set per test: `workers.kernels` jits the kernel lazily,
once per interpret setting, so this holds even when another module imported triton first). The `gpu` tests
run the compiled kernel directly and through the CUDA dispatch of `dequantize` (where NF4 may take the
bitsandbytes route instead: tests/workers/test_bnb_nf4.py).
"""

from __future__ import annotations

import pytest
import torch

from workers.quant import QuantSpec, dequantize, quantize

pytest.importorskip("triton")

from workers import kernels  # noqa: E402

KIND_BITS = [("nf", 2), ("nf", 3), ("nf", 4), ("int", 2), ("int", 3), ("int", 4), ("int", 8)]
SCALE_DTYPES = ["float16", "bfloat16", "float32"]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def weight():
    gen = torch.Generator().manual_seed(13)
    return torch.randn(8, 128, generator=gen) * 3


@pytest.mark.parametrize("kind,bits", KIND_BITS)
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_kernel_matches_torch_path(interpret, weight, kind, bits, scale_dtype):
    for group in (32, 64):
        q = quantize(weight, QuantSpec(kind, bits, group, scale_dtype))
        for dtype in OUT_DTYPES:
            got = kernels.dequantize_triton(q, dtype)
            assert got.dtype == dtype and got.shape == (8, 128)
            assert torch.equal(got, dequantize(q, dtype)), (kind, bits, group, scale_dtype, dtype)


def test_kernel_into_out_and_odd_shape(interpret):
    """`out=` is written in place; a shape whose size is not a multiple of the block (masked tail)."""
    w = torch.randn(5, 96, generator=torch.Generator().manual_seed(1))
    q = quantize(w, QuantSpec("int", 2, 32, "bfloat16"))
    buf = torch.empty(5, 96, dtype=torch.bfloat16)
    assert kernels.dequantize_triton(q, torch.bfloat16, out=buf) is buf
    assert torch.equal(buf, dequantize(q, torch.bfloat16))


def test_bf16_rounding_is_to_nearest_even(interpret):
    """Values on the halfway points between two bf16 numbers round to even, as torch's cast does."""
    w = torch.ones(1, 64)
    q = quantize(w, QuantSpec("int", 8, 64, "float32"))
    # codes 0..63 with a scale whose products land on bf16 halfway points: 1 + k * 2^-8
    q.scales.fill_(2.0**-8)
    q.zeros.fill_(1.0)
    q.packed.copy_(torch.arange(64, dtype=torch.uint8))
    assert torch.equal(kernels.dequantize_triton(q, torch.bfloat16), dequantize(q, torch.bfloat16))


@pytest.mark.gpu
def test_triton_kernel_on_cuda_three_bits(monkeypatch):
    """The compiled kernel itself (not through the dispatch) on 3 bits, with a masked tail."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.randn(1001, 228, generator=torch.Generator().manual_seed(4))
    for spec in (QuantSpec("nf", 3, 12, "bfloat16"), QuantSpec("int", 3, 76)):
        q = quantize(w, spec)
        for dtype in OUT_DTYPES:
            got = kernels.dequantize_triton(q.to("cuda"), dtype)
            assert torch.equal(got.cpu(), dequantize(q, dtype)), (spec.name, dtype)


@pytest.mark.parametrize("kind", ["nf", "int"])
def test_three_bits_masked_tail(interpret, kind):
    """3 bits (8 codes in 3 bytes, codes straddling bytes) on a size that ends inside a packing unit and a
    kernel block: 5 x 228 = 1140 codes, 142.5 units, groups of 12."""
    w = torch.randn(5, 228, generator=torch.Generator().manual_seed(3))
    q = quantize(w, QuantSpec(kind, 3, 12, "bfloat16"))
    for dtype in OUT_DTYPES:
        assert torch.equal(kernels.dequantize_triton(q, dtype), dequantize(q, dtype)), (kind, dtype)


def test_supports_refuses_other_output_dtypes(weight):
    q = quantize(weight, QuantSpec("nf", 3, 64))
    assert kernels.supports(q) and kernels.supports(q, torch.bfloat16)
    assert not kernels.supports(q, torch.float64)
    with pytest.raises(ValueError, match="output dtype"):
        kernels.dequantize_triton(q, torch.float64)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", [QuantSpec("nf", 4, 64), QuantSpec("nf", 2, 64), QuantSpec("int", 4, 32),
                                  QuantSpec("int", 8, 128, "bfloat16"), QuantSpec("nf", 3, 64),
                                  QuantSpec("int", 3, 32, "float32")])
def test_cuda_dispatch_matches_cpu(spec, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.randn(4096, 11008, generator=torch.Generator().manual_seed(0))
    q = quantize(w, spec)
    qc = q.to("cuda")
    for dtype in OUT_DTYPES:
        expected = dequantize(q, dtype)
        assert torch.equal(dequantize(qc, dtype).cpu(), expected), (spec.name, dtype)
        buf = torch.empty(q.shape, dtype=dtype, device="cuda")
        assert dequantize(qc, dtype, out=buf) is buf
        assert torch.equal(buf.cpu(), expected), (spec.name, dtype)
