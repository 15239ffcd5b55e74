"""Properties of the NF / INT quantizers, packing and the safetensors round trip."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.bench_dequant import old_dequantize  # the frozen pre-issue-13 dequantize: the bits to hold
from workers import quant
from workers.quant import QuantizedTensor, QuantSpec, dequantize, quantize
from workers.quant_codes import nf_codebook, pack_codes, packed_nbytes, unpack_codes

BNB_NF4 = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
ALL_SPECS = [("nf", 2), ("nf", 3), ("nf", 4), ("int", 2), ("int", 3), ("int", 4), ("int", 8)]


def test_nf4_codebook_equals_bitsandbytes_table():
    assert torch.allclose(nf_codebook(4), torch.tensor(BNB_NF4), atol=1e-6, rtol=0)


def test_nf2_codebook():
    assert torch.allclose(nf_codebook(2), torch.tensor([-1.0, 0.0, 0.33791, 1.0]), atol=1e-5, rtol=0)


def test_nf3_codebook_shape():
    book = nf_codebook(3)
    assert book.numel() == 8 and book[0] == -1 and book[-1] == 1 and (book == 0).sum() == 1
    assert torch.all(book[1:] > book[:-1])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("numel", [1, 3, 7, 8, 13, 1001, 4096])
def test_pack_unpack_identity(bits, numel):
    gen = torch.Generator().manual_seed(numel * 10 + bits)
    codes = torch.randint(0, 1 << bits, (numel,), generator=gen, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(numel, bits)
    assert torch.equal(unpack_codes(packed, bits, numel), codes)


def test_packing_density():
    assert packed_nbytes(4, 2) == 1 and packed_nbytes(8, 3) == 3 and packed_nbytes(2, 4) == 1
    assert packed_nbytes(1024, 2) == 256 and packed_nbytes(1024, 3) == 384 and packed_nbytes(1024, 4) == 512


def test_two_bit_layout_is_four_codes_per_byte():
    packed = pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2)
    assert packed.tolist() == [1 | 2 << 2 | 3 << 4]


def _weight(out_f=48, in_f=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, in_f, generator=gen) * 0.05 + 0.01


@pytest.mark.parametrize("kind,bits", ALL_SPECS)
def test_error_bounded_by_half_a_code_step(kind, bits):
    w = _weight()
    spec = QuantSpec(kind, bits, 32, scale_dtype="float32")
    q = quantize(w, spec)
    err = (w - dequantize(q)).abs().reshape(48, 4, 32)
    if kind == "nf":
        book = nf_codebook(bits)
        bound = (book[1:] - book[:-1]).max() / 2 * q.scales
    else:
        bound = q.scales / 2
    assert torch.all(err <= bound[..., None] * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("kind,bits", ALL_SPECS)
def test_codes_are_the_nearest_level(kind, bits):
    """Brute force on a small matrix: every code is the nearest representable value."""
    w = _weight(8, 64, seed=3)
    q = quantize(w, QuantSpec(kind, bits, 16, scale_dtype="float32"))
    groups = q.scales.float()[..., None]
    if kind == "nf":
        levels = nf_codebook(bits)[None, None, None, :] * groups[..., None]
    else:
        ramp = torch.arange(1 << bits, dtype=torch.float32)
        levels = ramp * groups[..., None] + q.zeros.float()[..., None, None]
    dist = (w.reshape(8, 4, 16)[..., None] - levels).abs()
    best = dist.min(dim=-1).values
    got = (w - dequantize(q)).abs().reshape(8, 4, 16)
    assert torch.allclose(got, best, atol=1e-6)


@pytest.mark.parametrize("kind,bits", ALL_SPECS)
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_safetensors_round_trip(tmp_path, kind, bits, scale_dtype):
    w = _weight(33, 96, seed=bits)
    q = quantize(w, QuantSpec(kind, bits, 32, scale_dtype=scale_dtype))
    path = tmp_path / "q.safetensors"
    save_file(q.state_dict(), str(path))
    back = QuantizedTensor.from_state_dict(load_file(str(path)))
    assert back.spec == q.spec and back.shape == (33, 96)
    assert torch.equal(back.codes(), q.codes())
    assert torch.equal(dequantize(back), dequantize(q))


def test_scale_dtype_is_applied_and_codes_match_stored_scales():
    w = _weight()
    q = quantize(w, QuantSpec("int", 4, 32))
    assert q.scales.dtype == torch.float16 and q.zeros.dtype == torch.float16
    assert torch.all(q.codes() <= 15)
    err = (w - dequantize(q)).abs().reshape(48, 4, 32)
    # fp16 rounding of the zero point may push a value past the last level by at most |zero| * 2^-11
    slack = q.zeros.float().abs() * 2**-10 + 1e-6
    assert torch.all(err <= (q.scales.float() / 2 + slack)[..., None])


def test_all_zero_group_is_exact_and_finite():
    w = _weight(4, 64)
    w[:, :32] = 0
    for kind, bits in ALL_SPECS:
        deq = dequantize(quantize(w, QuantSpec(kind, bits, 32)))
        assert torch.isfinite(deq).all() and torch.all(deq[:, :32] == 0)


def test_constant_group_is_exact_for_int():
    w = torch.full((2, 32), 0.25)
    assert torch.equal(dequantize(quantize(w, QuantSpec("int", 2, 32))), w)


def test_low_precision_input_uses_fp32_math():
    w = _weight()
    q16 = quantize(w.to(torch.bfloat16), QuantSpec("nf", 4, 32))
    q32 = quantize(w.to(torch.bfloat16).float(), QuantSpec("nf", 4, 32))
    assert torch.equal(q16.codes(), q32.codes())
    assert dequantize(q16, torch.bfloat16).dtype == torch.bfloat16


def test_packed_size_two_bit():
    q = quantize(_weight(256, 1024), QuantSpec("nf", 2, 64))
    assert q.packed.numel() == 256 * 1024 // 4
    assert q.nbytes / (256 * 1024 * 2) <= 0.16


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(kind="fp", bits=4, group_size=64), "QuantSpec.kind"),
        (dict(kind="nf", bits=8, group_size=64), "QuantSpec.bits"),
        (dict(kind="nf", bits=1, group_size=64), "QuantSpec.bits"),
        (dict(kind="int", bits=5, group_size=64), "QuantSpec.bits"),
        (dict(kind="int", bits=4.0, group_size=64), "QuantSpec.bits"),
        (dict(kind="int", bits=True, group_size=64), "QuantSpec.bits"),
        (dict(kind="int", bits=4, group_size=0), "QuantSpec.group_size"),
        (dict(kind="int", bits=4, group_size=-64), "QuantSpec.group_size"),
        (dict(kind="int", bits=4, group_size="64"), "QuantSpec.group_size"),
        (dict(kind="nf", bits=4, group_size=64, scale_dtype="float8"), "QuantSpec.scale_dtype"),
    ],
)
def test_bad_spec_names_the_field_and_allowed_values(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        QuantSpec(**kwargs)
    assert "expected" in str(info.value) or "supports" in str(info.value)


def test_nf8_error_lists_allowed_bits():
    with pytest.raises(ValueError, match=r"\[2, 3, 4\]"):
        QuantSpec("nf", 8, 64)


def test_group_size_must_divide_in_features():
    with pytest.raises(ValueError, match=r"\(16, 100\).*group_size=64"):
        quantize(torch.randn(16, 100), QuantSpec("nf", 4, 64))


def test_non_matrix_rejected():
    with pytest.raises(ValueError, match="2-D"):
        quantize(torch.randn(4, 4, 64), QuantSpec("nf", 4, 64))


def test_nf_codebook_bad_bits():
    with pytest.raises(ValueError, match="bits"):
        nf_codebook(5)


def test_damaged_state_dict_gives_clear_error():
    tensors = quantize(_weight(), QuantSpec("int", 4, 32)).state_dict()
    truncated = dict(tensors, codes=tensors["codes"][:-5])
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor.from_state_dict(truncated)
    with pytest.raises(ValueError, match="scales shape"):
        QuantizedTensor.from_state_dict(dict(tensors, scales=tensors["scales"][:, :1]))
    with pytest.raises(ValueError, match="missing"):
        QuantizedTensor.from_state_dict({"codes": tensors["codes"]})
    no_zeros = {k: v for k, v in tensors.items() if k != "zeros"}
    with pytest.raises(ValueError, match="zero points"):
        QuantizedTensor.from_state_dict(no_zeros)


# ------------------------------------------------------------------ the fast dequantization, bit for bit


def _random_quantized(kind, bits, shape, group_size, scale_dtype, seed) -> QuantizedTensor:
    """Arbitrary packed bytes (padding bits included) and scales / zeros over many magnitudes, some exactly 0."""
    gen = torch.Generator().manual_seed(seed)
    spec = QuantSpec(kind, bits, group_size, scale_dtype)
    packed = torch.randint(0, 256, (packed_nbytes(shape[0] * shape[1], bits),), generator=gen, dtype=torch.uint8)
    groups = (shape[0], shape[1] // group_size)

    def table():
        t = torch.randn(groups, generator=gen) * torch.randn(groups, generator=gen).mul(3).exp()
        return t.masked_fill(torch.rand(groups, generator=gen) < 0.05, 0.0).to(quant.SCALE_DTYPES[scale_dtype])

    scales = table()
    return QuantizedTensor(packed, scales, table() if kind == "int" else None, spec, shape)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


SHAPES = [(48, 128, 32), (7, 21, 7), (3, 5, 1), (130, 1024, 64), (5, 4096, 4096)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.mark.parametrize("kind,bits", ALL_SPECS)
@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("span", [quant.CPU_SPAN_NUMEL, 96])  # 96: many spans, a short last one
def test_dequantize_is_bit_identical_to_the_reference(monkeypatch, kind, bits, scale_dtype, span):
    monkeypatch.setattr(quant, "CPU_SPAN_NUMEL", span)
    for i, (out_f, in_f, group) in enumerate(SHAPES):
        q = _random_quantized(kind, bits, (out_f, in_f), group, scale_dtype, seed=100 * bits + i)
        for dtype in OUT_DTYPES:
            got, want = dequantize(q, dtype), old_dequantize(q, dtype)
            assert got.dtype == dtype and got.shape == (out_f, in_f)
            assert torch.equal(_bits(got), _bits(want)), (kind, bits, scale_dtype, dtype, (out_f, in_f, group))


@pytest.mark.parametrize("kind,bits", ALL_SPECS)
def test_dequantize_of_quantized_weights_is_bit_identical(kind, bits):
    """The same on what `quantize` produces (codes chosen against the stored scales)."""
    q = quantize(_weight(64, 256, seed=bits), QuantSpec(kind, bits, 64, "bfloat16"))
    for dtype in OUT_DTYPES:
        assert torch.equal(_bits(dequantize(q, dtype)), _bits(old_dequantize(q, dtype)))


def test_dequantize_into_out():
    q = _random_quantized("nf", 4, (16, 128), 32, "float16", seed=1)
    buf = torch.full((16, 128), float("nan"), dtype=torch.bfloat16)
    assert dequantize(q, out=buf) is buf
    assert torch.equal(_bits(buf), _bits(old_dequantize(q, torch.bfloat16)))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize(q, out=torch.empty(128, 16).T)
    with pytest.raises(ValueError, match=r"\(16, 128\)"):
        dequantize(q, out=torch.empty(16, 64))
