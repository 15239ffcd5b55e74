"""loftune's NF4 layout converted to bitsandbytes', against `workers.quant.dequantize`, bit for bit.

On the CPU, bitsandbytes' own CPU `dequantize_4bit` stands in for its CUDA kernel (the same layout and the same
fp32 products); the `gpu` tests run the CUDA kernel. loftune's NF4 codebook is built the way bitsandbytes builds
its table (workers/quant.py), so the two are equal bit for bit (asserted here), and the route is exact for real
matrices; a codebook that differed would be refused (`test_a_different_codebook_is_refused`).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from workers import kernels, quant, quant_codes
from workers.quant import QuantSpec, dequantize, quantize

pytest.importorskip("bitsandbytes", reason="bitsandbytes (the dev extra pins 0.50.2) is not installed")

import bitsandbytes.functional as F  # noqa: E402

from workers import bnb_nf4  # noqa: E402

OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SCALE_DTYPES = ["float16", "bfloat16", "float32"]
INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (torch.equal would take -0 for +0)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(INT_VIEW[a.dtype]),
                                                                      b.view(INT_VIEW[b.dtype]))


def _clear_caches():
    for fn in (quant_codes.nf_midpoints, quant._decode_table, kernels._book, bnb_nf4.codebook_matches):
        fn.cache_clear()
    bnb_nf4._entries.clear()


@pytest.fixture
def bnb_codebook():
    """loftune's NF4 codebook is bitsandbytes' table, bit for bit (the route's exactness rests on it)."""
    ours, theirs = quant_codes.nf_codebook(4), F.get_4bit_type("nf4", device="cpu")
    assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32))
    assert bnb_nf4.codebook_matches()


@pytest.fixture
def other_codebook(monkeypatch):
    """An NF4 codebook one float32 ulp away from bnb's in one entry (what loftune had until Dec 2026)."""
    table = list(F.get_4bit_type("nf4", device="cpu").tolist())
    table[3] = float(torch.nextafter(torch.tensor(table[3]), torch.tensor(0.0)))
    original = quant_codes._nf_codebook_f64
    monkeypatch.setattr(quant_codes, "_nf_codebook_f64", lambda bits: tuple(table) if bits == 4 else original(bits))
    _clear_caches()
    yield
    monkeypatch.undo()
    _clear_caches()


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Normal weights with a zero group (scale 0) and a wide range of magnitudes across rows."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-3, 2, rows)[:, None]
    w[0, :32] = 0
    return w


def bnb_cpu(q: quant.QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """bitsandbytes' CPU dequantize_4bit of q's converted buffers (no exactness check)."""
    converted = bnb_nf4.convert_layout(q)
    return F.dequantize_4bit(converted.packed, converted.quant_state(dtype))


# ------------------------------------------------------------------------------ bnb's layout, as found


def test_bnb_nibble_order_and_flat_blocks():
    """bnb reads a byte's high nibble first, and its blocks run over the flattened tensor across rows."""
    book = F.get_4bit_type("nf4", device="cpu")
    packed = torch.full((96, 1), 0x0F, dtype=torch.uint8)  # codes 0 (high nibble), 15 (low nibble), ...
    state = F.QuantState(absmax=torch.tensor([1.0, 2.0, 4.0]), shape=torch.Size([2, 96]), code=book,
                         blocksize=64, quant_type="nf4", dtype=torch.float32)
    out = F.dequantize_4bit(packed, state).view(-1)
    assert out[:2].tolist() == [-1.0, 1.0]
    assert out.abs().view(3, 64).amax(dim=1).tolist() == [1.0, 2.0, 4.0]  # row 0 ends inside block 1
    # loftune's order is the other one: the first code of a byte is its low nibble
    assert quant_codes.unpack_codes(torch.tensor([0x0F], dtype=torch.uint8), 4, 2).tolist() == [15, 0]


def test_bnb_blocksizes_are_ours():
    """BNB_BLOCKSIZES is exactly what bnb's dequantize_4bit checks accept (its shape functions, on meta)."""
    packed = torch.empty(32, 1, dtype=torch.uint8, device="meta")
    absmax = torch.empty(1, device="meta")
    for blocksize in (*bnb_nf4.BNB_BLOCKSIZES, 16, 48, 8192):
        call = lambda b=blocksize: torch.ops.bitsandbytes.dequantize_4bit(  # noqa: E731
            packed, absmax, b, "nf4", [1, 64], torch.bfloat16)
        if blocksize in bnb_nf4.BNB_BLOCKSIZES:
            call()
        else:
            with pytest.raises(RuntimeError, match="invalid blocksize"):
                call()


def test_a_different_codebook_is_refused(other_codebook):
    """The codebook check is bit equality with bnb's table: a one-ulp difference refuses every NF4 matrix."""
    assert not bnb_nf4.codebook_matches()
    reason = bnb_nf4.exact_reason(quantize(weight(3, 128), QuantSpec("nf", 4, 64)))
    assert reason is not None and "codebook" in reason


def test_real_nf4_matrices_convert_exactly(bnb_codebook):
    q = quantize(weight(3, 128), QuantSpec("nf", 4, 64))
    assert bnb_nf4.exact_reason(q) is None
    assert not bnb_nf4.bnb_supports(q)  # a CPU tensor never takes the route


# ---------------------------------------------------------------------------------- exact conversion


@pytest.mark.parametrize("shape,group", [((5, 128), 64), ((7, 256), 128), ((3, 96), 32), ((9, 512), 256),
                                         ((1, 1024), 1024)])
@pytest.mark.parametrize("scale_dtype", SCALE_DTYPES)
def test_conversion_is_exact(bnb_codebook, shape, group, scale_dtype):
    q = quantize(weight(*shape), QuantSpec("nf", 4, group, scale_dtype))
    assert bnb_nf4.exact_reason(q) is None
    for dtype in OUT_DTYPES:
        expected = dequantize(q, dtype)
        assert same_bits(bnb_cpu(q, dtype), expected), (shape, group, scale_dtype, dtype)
        assert same_bits(bnb_nf4.dequantize_bnb(q, dtype), expected), (shape, group, scale_dtype, dtype)


def test_dequantize_bnb_into_out(bnb_codebook):
    q = quantize(weight(5, 128, seed=1), QuantSpec("nf", 4, 64, "bfloat16"))
    buf = torch.empty(5, 128, dtype=torch.bfloat16)
    assert bnb_nf4.dequantize_bnb(q, out=buf) is buf
    assert same_bits(buf, dequantize(q, torch.bfloat16))
    with pytest.raises(ValueError, match="output dtype"):
        bnb_nf4.dequantize_bnb(q, torch.float64)


def test_quant_state_round_trips(bnb_codebook):
    """The QuantState carries what bnb needs: nf4, the group as blocksize, fp32 absmax, shape, dtype."""
    q = quantize(weight(3, 128, seed=2), QuantSpec("nf", 4, 64, "float16"))
    state = bnb_nf4.convert_layout(q).quant_state(torch.float16)
    assert (state.quant_type, state.blocksize, state.dtype, tuple(state.shape)) == ("nf4", 64, torch.float16,
                                                                                    (3, 128))
    assert state.absmax.dtype == torch.float32 and torch.equal(state.absmax, q.scales.float().view(-1))
    again = F.QuantState.from_dict(state.as_dict(packed=True), device=torch.device("cpu"))
    packed = bnb_nf4.convert_layout(q).packed
    assert same_bits(F.dequantize_4bit(packed, again), dequantize(q, torch.float16))


# -------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("spec,shape,why", [
    (QuantSpec("nf", 2, 64), (2, 128), "not NF4"),
    (QuantSpec("nf", 3, 64), (2, 128), "not NF4"),
    (QuantSpec("int", 4, 64), (2, 128), "not NF4"),
    (QuantSpec("nf", 4, 16), (2, 64), "group size 16"),
    (QuantSpec("nf", 4, 48), (2, 96), "group size 48"),
    (QuantSpec("nf", 4, 8192), (1, 8192), "group size 8192"),
])
def test_inexact_layouts_are_refused(bnb_codebook, spec, shape, why):
    q = quantize(weight(*shape), spec)
    assert why in bnb_nf4.exact_reason(q)
    assert bnb_nf4.prepare(q) is None
    with pytest.raises(ValueError, match="does not convert exactly"):
        bnb_nf4.dequantize_bnb(q, torch.bfloat16)


def test_more_weights_than_int32_are_refused():
    """bnb's CUDA launcher takes the element count as an int32 (checked from the shape alone, no tensors)."""
    tiny = quant.QuantizedTensor(torch.zeros(1, dtype=torch.uint8), torch.ones(1, 1), None, QuantSpec("nf", 4, 64),
                                 (65536, 32768))
    assert "int32" in bnb_nf4.exact_reason(tiny)


@pytest.mark.parametrize("scale_dtype,magnitude", [("bfloat16", 1e-38), ("float32", 1e-37), ("float16", 1e6)])
def test_tiny_or_infinite_scales_are_refused(bnb_codebook, scale_dtype, magnitude):
    """Scales whose products fast math would flush (bnb's CUDA build), and scales that overflowed to inf."""
    q = quantize(weight(3, 128) * magnitude, QuantSpec("nf", 4, 64, scale_dtype))
    assert "scale" in bnb_nf4.exact_reason(q)


# ------------------------------------------------------------------------------------ the weak cache


def test_prepare_keeps_buffers_and_follows_writes(bnb_codebook):
    q = quantize(weight(5, 128, seed=3), QuantSpec("nf", 4, 64, "float32"))
    first = bnb_nf4.prepare(q)
    assert first is not None and bnb_nf4.prepare(q) is first
    assert first.absmax.data_ptr() == q.scales.data_ptr()  # fp32 scales are shared, not copied
    q.packed[:8] = 0x77  # an in-place write: the prepared buffers are remade from the new codes
    assert same_bits(bnb_nf4.dequantize_bnb(q, torch.float32), dequantize(q, torch.float32))
    assert bnb_nf4.prepare(q) is not first
    q.scales = q.scales * 2  # a replaced tensor: the same
    assert same_bits(bnb_nf4.dequantize_bnb(q, torch.bfloat16), dequantize(q, torch.bfloat16))


def test_entries_go_with_their_matrix(bnb_codebook):
    q = quantize(weight(3, 128, seed=4), QuantSpec("nf", 4, 64))
    bnb_nf4.prepare(q)
    key, ref = id(q), weakref.ref(q)
    assert key in bnb_nf4._entries
    del q
    gc.collect()
    assert ref() is None and key not in bnb_nf4._entries


# ------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("shape,spec", [((4096, 11008), QuantSpec("nf", 4, 64)),
                                        ((1001, 4096), QuantSpec("nf", 4, 128, "bfloat16")),
                                        ((333, 2048), QuantSpec("nf", 4, 32, "float32"))])
def test_bnb_cuda_kernel_matches_torch_path(bnb_codebook, monkeypatch, shape, spec):
    """bitsandbytes' CUDA kernel, chosen by the dispatch, against the CPU torch path (bnb's table in both)."""
    calls = []
    real = bnb_nf4.dequantize_bnb
    monkeypatch.setattr(bnb_nf4, "dequantize_bnb", lambda *a, **k: calls.append(1) or real(*a, **k))
    q = quantize(weight(*shape), spec)
    qc = q.to("cuda")
    assert bnb_nf4.bnb_supports(qc), ("bnb CUDA library loaded:", bnb_nf4._bnb_cuda_ready(), bnb_nf4.exact_reason(qc))
    for dtype in OUT_DTYPES:
        expected = dequantize(q, dtype)
        assert same_bits(dequantize(qc, dtype).cpu(), expected), (spec.name, dtype)
        buf = torch.empty(shape, dtype=dtype, device="cuda")
        assert dequantize(qc, dtype, out=buf) is buf
        assert same_bits(buf.cpu(), expected), (spec.name, dtype)
    assert len(calls) == 2 * len(OUT_DTYPES)
    bnb_nf4.prepare(qc)  # the kept buffers give the same bits
    assert same_bits(dequantize(qc, torch.bfloat16).cpu(), dequantize(q, torch.bfloat16))


@pytest.mark.gpu
def test_cuda_nf4_with_real_codebook_stays_exact():
    """With loftune's own codebook the dispatch refuses bnb while the tables differ, and stays exact."""
    q = quantize(weight(512, 4096), QuantSpec("nf", 4, 64))
    qc = q.to("cuda")
    assert bnb_nf4.bnb_supports(qc) == bnb_nf4.codebook_matches()
    assert same_bits(dequantize(qc, torch.bfloat16).cpu(), dequantize(q, torch.bfloat16))
