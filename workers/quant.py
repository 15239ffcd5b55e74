"""Group-wise weight quantizers: NormalFloat (NF-k) and asymmetric integer (INT-k).

A weight W has the PyTorch layout [out, in]. Groups are contiguous runs of `group_size` weights along `in`
within one output row. A quantized matrix is the LoftQ paper's (M, T): integer codes M, densely packed,
plus a lookup table T (the NF codebook, or per-group scale and zero point for INT).

    NF-k:  W[o, i] ~ codebook[c] * scale[o, g]            (symmetric, absmax scale)
    INT-k: W[o, i] ~ scale[o, g] * c + zero[o, g]           (asymmetric min-max, QA-LoRA's form)

Everything is vectorized: no Python loop over groups or elements (quantization runs over blocks of ~2^18
weights to keep temporaries small), and no [numel, 2^bits] temporary (an NF code is the count of codebook
midpoints below the normalized value).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from workers.quant_codes import NF_BITS, nf_codebook, nf_midpoints, pack_codes, pack_unit, packed_nbytes, unpack_codes

ALLOWED_BITS = {"nf": NF_BITS, "int": (2, 3, 4, 8)}
SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_KIND_IDS = {"nf": 0, "int": 1}
QMETA_VERSION = 1


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one matrix: quantizer kind, bits per weight, group size and scale storage dtype."""

    kind: str
    bits: int
    group_size: int
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.kind not in ALLOWED_BITS:
            raise ValueError(f"QuantSpec.kind: expected one of {sorted(ALLOWED_BITS)}, got {self.kind!r}")
        allowed = ALLOWED_BITS[self.kind]
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or self.bits not in allowed:
            raise ValueError(
                f"QuantSpec.bits: {self.kind} quantization supports bits in {list(allowed)}, got {self.bits!r}"
            )
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"QuantSpec.group_size: expected a positive integer, got {self.group_size!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(
                f"QuantSpec.scale_dtype: expected one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}"
            )

    @property
    def name(self) -> str:
        """Short readable name, e.g. `nf4-g64`."""
        return f"{self.kind}{self.bits}-g{self.group_size}"

    @property
    def levels(self) -> int:
        return 1 << self.bits


@dataclass
class QuantizedTensor:
    """A quantized [out, in] matrix: packed codes, per-group scales (and zero points for INT)."""

    packed: torch.Tensor  # uint8, densely packed codes of the row-major [out, in] matrix
    scales: torch.Tensor  # [out, in // group_size], in the spec's scale dtype
    zeros: torch.Tensor | None  # [out, in // group_size] for INT, None for NF
    spec: QuantSpec
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        """Bytes of the packed codes plus scales and zero points."""
        extra = self.zeros.numel() * self.zeros.element_size() if self.zeros is not None else 0
        return self.packed.numel() + self.scales.numel() * self.scales.element_size() + extra

    def codes(self) -> torch.Tensor:
        """The unpacked integer codes, uint8 [out, in]."""
        return unpack_codes(self.packed, self.spec.bits, self.shape[0] * self.shape[1]).view(self.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that describe this matrix completely (safe to write with safetensors)."""
        kind_id = _KIND_IDS[self.spec.kind]
        meta = [QMETA_VERSION, kind_id, self.spec.bits, self.spec.group_size, *self.shape]
        out = {"codes": self.packed, "scales": self.scales, "qmeta": torch.tensor(meta, dtype=torch.int64)}
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor]) -> QuantizedTensor:
        """Inverse of `state_dict`; checks every shape so a damaged file gives a clear error."""
        missing = [k for k in ("codes", "scales", "qmeta") if k not in tensors]
        if missing:
            raise ValueError(f"quantized tensor is missing {missing}")
        meta = tensors["qmeta"].tolist()
        if len(meta) != 6 or meta[0] != QMETA_VERSION:
            raise ValueError(f"quantized tensor: unsupported qmeta {meta} (expected version {QMETA_VERSION})")
        _, kind_id, bits, group_size, out_f, in_f = meta
        kind = {v: k for k, v in _KIND_IDS.items()}.get(kind_id)
        if kind is None:
            raise ValueError(f"quantized tensor: unknown kind id {kind_id}")
        scales = tensors["scales"]
        dtype_name = next((n for n, d in SCALE_DTYPES.items() if d == scales.dtype), None)
        if dtype_name is None:
            raise ValueError(f"quantized tensor: scales have unsupported dtype {scales.dtype}")
        spec = QuantSpec(kind, bits, group_size, dtype_name)
        q = cls(tensors["codes"], scales, tensors.get("zeros"), spec, (out_f, in_f))
        q.check()
        return q

    def check(self) -> None:
        """Raise ValueError unless every tensor has the size the spec and shape imply."""
        out_f, in_f = self.shape
        groups = (out_f, in_f // self.spec.group_size)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != packed_nbytes(out_f * in_f, self.spec.bits):
            raise ValueError(
                f"quantized tensor: codes have {self.packed.numel()} {self.packed.dtype} values, expected "
                f"{packed_nbytes(out_f * in_f, self.spec.bits)} uint8 for shape {self.shape} at {self.spec.bits} bits"
            )
        if tuple(self.scales.shape) != groups:
            raise ValueError(f"quantized tensor: scales shape {tuple(self.scales.shape)}, expected {groups}")
        if (self.spec.kind == "int") != (self.zeros is not None):
            raise ValueError(f"quantized tensor: zero points are required for int and absent for nf ({self.spec})")
        if self.zeros is not None and tuple(self.zeros.shape) != groups:
            raise ValueError(f"quantized tensor: zeros shape {tuple(self.zeros.shape)}, expected {groups}")

    def to(self, device: torch.device | str) -> QuantizedTensor:
        zeros = self.zeros.to(device) if self.zeros is not None else None
        return QuantizedTensor(self.packed.to(device), self.scales.to(device), zeros, self.spec, self.shape)


# ----------------------------------------------------------------------------------------- quantization


def check_groupable(shape: tuple[int, ...], group_size: int, name: str = "weight") -> None:
    """Raise ValueError unless `shape` is a 2-D [out, in] with `in` divisible by `group_size`."""
    if len(shape) != 2:
        raise ValueError(f"{name}: expected a 2-D [out, in] weight, got shape {tuple(shape)}")
    if shape[1] % group_size != 0:
        raise ValueError(
            f"{name}: shape {tuple(shape)} has in_features={shape[1]}, which is not divisible by "
            f"group_size={group_size}; pick a group size that divides {shape[1]}"
        )


# Work runs over blocks of about 2^18 weights: fresh multi-MB temporaries cost page faults that are
# several times the arithmetic on these machines, while small ones are reused from the heap.
BLOCK_NUMEL = 1 << 18


def _row_blocks(rows: int, cols: int) -> list[slice]:
    step = max(1, BLOCK_NUMEL // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]


def _quantize_block(w: torch.Tensor, spec: QuantSpec, sdtype: torch.dtype, codes_out: torch.Tensor):
    """Quantize grouped weights [rows, groups, g] into `codes_out`; returns (scales, zeros or None)."""
    lo, hi = torch.aminmax(w, dim=-1)
    if spec.kind == "nf":
        scales = torch.maximum(hi, -lo).to(sdtype)
        s = scales.float()
        inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
        x = w * inv[..., None]
        # nearest code = how many codebook midpoints lie below x (what bucketize computes, 3-4x faster
        # here for at most 15 midpoints, and never a [numel, 2^bits] temporary)
        codes = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
        for midpoint in nf_midpoints(spec.bits):
            codes += x > midpoint
        codes_out.copy_(codes.view(codes_out.shape))
        return scales, None
    scales = ((hi - lo) / (spec.levels - 1)).to(sdtype)
    zeros = lo.to(sdtype)
    s = scales.float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    codes = (w - zeros.float()[..., None]).mul_(inv[..., None]).round_().clamp_(0, spec.levels - 1)
    codes_out.copy_(codes.view(codes_out.shape))
    return scales, zeros


def quantize_codes(
    weight: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize to unpacked codes: (codes uint8 [out, in], scales, zeros or None), math in float32.

    Codes are computed against the scales as stored (rounded to the scale dtype), so dequantizing the
    stored tensors gives exactly the values the codes were chosen for.
    """
    check_groupable(tuple(weight.shape), spec.group_size)
    out_f, in_f = weight.shape
    groups = in_f // spec.group_size
    sdtype = SCALE_DTYPES[spec.scale_dtype]
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=weight.device)
    scales = torch.empty(out_f, groups, dtype=sdtype, device=weight.device)
    zeros = torch.empty_like(scales) if spec.kind == "int" else None
    for rows in _row_blocks(out_f, in_f):
        w = weight[rows].detach().float().reshape(-1, groups, spec.group_size)
        scales[rows], block_zeros = _quantize_block(w, spec, sdtype, codes[rows])
        if zeros is not None:
            zeros[rows] = block_zeros
    return codes, scales, zeros


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Values of unpacked codes [out, in] under per-group scales (and zeros), as `dtype` (into `out`)."""
    out_f, in_f = codes.shape
    groups = in_f // spec.group_size
    if out is None:
        out = torch.empty(out_f, in_f, dtype=dtype, device=codes.device)
    book = nf_codebook(spec.bits).to(codes.device) if spec.kind == "nf" else None
    for rows in _row_blocks(out_f, in_f):
        c = codes[rows].reshape(-1, groups, spec.group_size)
        s = scales[rows].float()[..., None]
        if book is not None:
            values = book[c.long()] * s
        else:
            values = c.float().mul_(s).add_(zeros[rows].float()[..., None])
        out[rows] = values.view(-1, in_f)
    return out


def quantize(weight: torch.Tensor, spec: QuantSpec) -> QuantizedTensor:
    """Quantize an [out, in] weight group-wise along `in`; codes are packed densely."""
    codes, scales, zeros = quantize_codes(weight, spec)
    return QuantizedTensor(pack_codes(codes, spec.bits), scales, zeros, spec, tuple(weight.shape))


def dequantize(
    q: QuantizedTensor, dtype: torch.dtype = torch.float32, *, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The [out, in] matrix a QuantizedTensor stands for, as `dtype` (or into `out`, contiguous [out, in]).

    Values are the fp32 products codebook[c] * scale (INT: c * scale + zero, two roundings, no FMA) rounded
    once to the output dtype, bit for bit what unpacking the codes and multiplying gives. A vectorized pass
    over the packed bytes (the whole matrix at once off the CPU, spans of ~2^20 weights on it): a table maps
    each byte (3 bits: each 12-bit field) to the fp32 values of the codes it holds, then the group scales
    (and zeros) broadcast in place. On CUDA, NF4 goes through bitsandbytes' kernel where loftune's layout
    converts exactly (`workers.bnb_nf4`), else the fused Triton kernel of `workers.kernels` (same bits); this
    path everywhere else.
    """
    if q.packed.device.type == "cuda":
        from workers import bnb_nf4, kernels

        out_dtype = dtype if out is None else out.dtype
        if bnb_nf4.bnb_supports(q, out_dtype):
            return bnb_nf4.dequantize_bnb(q, dtype, out=out)
        if kernels.triton_available() and kernels.supports(q, out_dtype):
            return kernels.dequantize_triton(q, dtype, out=out)
    out = _output_for(q, dtype, out)
    numel = q.shape[0] * q.shape[1]
    if numel == 0:
        return out
    span = _span_numel(q.spec, numel, q.packed.device)
    work = _SpanWork(q, span, out.dtype)
    flat = out.view(-1)
    for start in range(0, numel, span):
        work.run(start, min(span, numel - start), flat)
    return out


def _output_for(q: QuantizedTensor, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=dtype, device=q.packed.device)
    if tuple(out.shape) != tuple(q.shape) or not out.is_contiguous() or out.device != q.packed.device:
        raise ValueError(f"dequantize: out must be a contiguous {tuple(q.shape)} tensor on {q.packed.device}, "
                         f"got {tuple(out.shape)} on {out.device}")
    return out


# Off the CPU the whole matrix is one span. On the CPU a span is about 2^20 weights: the per-span work
# buffers then come back from the heap warm, where whole-matrix temporaries (int32 indices, fp32 values:
# 3x a bf16 output) cost fresh page faults that took longer than the decoding itself (bench_dequant.py),
# and would add 3x the transient weight to the training peak.
CPU_SPAN_NUMEL = 1 << 20


def _span_numel(spec: QuantSpec, numel: int, device: torch.device) -> int:
    """Codes per span: whole groups and whole packing units, so every span starts on a byte and a group."""
    unit = math.lcm(spec.group_size, pack_unit(spec.bits)[0])
    whole = -(-numel // unit) * unit
    return whole if device.type != "cpu" else min(whole, max(1, CPU_SPAN_NUMEL // unit) * unit)


# How many codes one table index covers, and the dtype that holds that many fp32 values, so one
# `index_select` row is a single wide element (a 1-D gather is many times faster than one over rows).
_CODES_PER_INDEX = {2: 4, 3: 4, 4: 2}
_WIDE_DTYPES = {2: torch.int64, 4: torch.complex128}


@cache
def _decode_table(kind: str, bits: int, device: str) -> torch.Tensor:
    """Index (a byte; for 3 bits a 12-bit field) -> fp32 values of the codes it packs, as a 1-D wide tensor."""
    per = _CODES_PER_INDEX[bits]
    index = torch.arange(1 << (per * bits), dtype=torch.int64)
    codes = (index[:, None] >> (torch.arange(per) * bits)) & ((1 << bits) - 1)
    values = nf_codebook(bits)[codes] if kind == "nf" else codes.to(torch.float32)
    return values.contiguous().view(_WIDE_DTYPES[per]).view(-1).to(device)


class _SpanWork:
    """Work buffers and tables for dequantizing one matrix span by span (the buffers are reused)."""

    def __init__(self, q: QuantizedTensor, span: int, out_dtype: torch.dtype):
        self.q, self.bits, self.group = q, q.spec.bits, q.spec.group_size
        device = q.packed.device
        self.scales = q.scales.view(-1)
        self.zeros = q.zeros.view(-1) if q.zeros is not None else None
        padded = -(-span // 8) * 8  # room for the last unit's padding codes
        # fp32 output is decoded in place; other dtypes go through one fp32 span buffer
        self.values = None if out_dtype == torch.float32 else torch.empty(padded, device=device)
        if self.bits != 8:
            self.table = _decode_table(q.spec.kind, self.bits, str(device))
            self.index = torch.empty(padded // _CODES_PER_INDEX[self.bits], dtype=torch.int32, device=device)

    def run(self, start: int, n: int, flat_out: torch.Tensor) -> None:
        """Dequantize codes [start, start + n) of the row-major matrix into flat_out[start: start + n]."""
        padded = -(-n // pack_unit(self.bits)[0]) * pack_unit(self.bits)[0]
        # the wide-dtype view of a direct write needs the span 16-byte aligned within its storage
        direct = (self.values is None and start + padded <= flat_out.numel()
                  and flat_out.storage_offset() % 4 == 0)
        values = flat_out[start: start + padded] if direct else self._fp32_buffer(padded, flat_out.device)
        self._decode(start, padded, values)
        groups = values[:n].view(-1, self.group)
        first, last = start // self.group, (start + n) // self.group
        groups.mul_(self.scales[first:last, None].float())
        if self.zeros is not None:
            groups.add_(self.zeros[first:last, None].float())
        if not direct:
            flat_out[start: start + n].copy_(values[:n])

    def _fp32_buffer(self, padded: int, device: torch.device) -> torch.Tensor:
        if self.values is None:  # fp32 output whose last span has padding codes
            self.values = torch.empty(-(-padded // 8) * 8, device=device)
        return self.values[:padded]

    def _decode(self, start: int, padded: int, values: torch.Tensor) -> None:
        """fp32 code values (NF: codebook entries; INT: the integer codes) of `padded` codes from `start`."""
        unit_codes, unit_bytes = pack_unit(self.bits)
        first_byte = start // unit_codes * unit_bytes
        nbytes = padded // unit_codes * unit_bytes
        packed = self.q.packed[first_byte: first_byte + nbytes]
        if self.bits == 8:
            values.copy_(packed)  # INT8: the byte is the code
            return
        index = self.index[: padded // _CODES_PER_INDEX[self.bits]]
        if self.bits == 3:
            _three_bit_fields(packed.view(-1, 3), index.view(-1, 2))
        else:
            index.copy_(packed)
        torch.index_select(self.table, 0, index, out=values.view(self.table.dtype))


def _three_bit_fields(units: torch.Tensor, index: torch.Tensor) -> None:
    """Split each 3-byte unit (eight little-endian 3-bit codes) into its two 12-bit halves, in place."""
    low, high = index[:, 0], index[:, 1]
    low.copy_(units[:, 1]).bitwise_and_(0xF).bitwise_left_shift_(8).bitwise_or_(units[:, 0])
    high.copy_(units[:, 2]).bitwise_left_shift_(4).bitwise_or_(units[:, 1] >> 4)
