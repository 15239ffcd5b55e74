"""The codes of a quantized matrix: the NormalFloat codebook they index, and their dense packing into bytes.

NF-k codes index 2^k normal quantiles in [-1, 1] (QLoRA's construction, bitsandbytes' NF4 table bit for bit);
INT-k codes are the integers themselves. Either way k-bit codes pack densely, little-endian within the smallest
whole-byte unit (2-bit: 4 codes in 1 byte, 3-bit: 8 in 3, 4-bit: 2 in 1, 8-bit: 1 in 1).
"""

from __future__ import annotations

import math
from functools import cache

import torch

NF_BITS = (2, 3, 4)
NF_OFFSET = 0.9677083


@cache
def _nf_codebook_f64(bits: int) -> tuple[float, ...]:
    """QLoRA's construction (bitsandbytes' create_normal_map) step for step in its dtypes, so that NF4 is
    bitsandbytes' table bit for bit and its CUDA kernel dequantizes our codes exactly: quantile points from a
    float32 linspace, the normal inverse in float64, rounded to float32, normalized by the maximum in float32.
    (Until Dec 2026 every step ran in float64: values 1-6 float32 ulps away, far below any quantization error.)"""
    half = 2 ** (bits - 1)

    def ppf(p: torch.Tensor) -> torch.Tensor:
        return torch.special.ndtri(p.double()).float()

    pos = ppf(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float32)[:-1])
    neg = -ppf(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float32)[:-1])
    values = torch.cat([pos, torch.zeros(1), neg]).sort().values
    return tuple((values / values.max()).tolist())


@cache
def nf_midpoints(bits: int) -> tuple[float, ...]:
    book = torch.tensor(_nf_codebook_f64(bits), dtype=torch.float32)
    return tuple(((book[1:] + book[:-1]) / 2).tolist())


def nf_codebook(bits: int) -> torch.Tensor:
    """The NormalFloat-k codebook (2^k sorted values in [-1, 1], zero included), as float32.

    Built from normal quantiles as in QLoRA; NF4 equals the bitsandbytes table bit for bit (tested).
    """
    if bits not in NF_BITS:
        raise ValueError(f"nf_codebook: bits must be one of {list(NF_BITS)}, got {bits!r}")
    return torch.tensor(_nf_codebook_f64(bits), dtype=torch.float32)


def pack_unit(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte unit: 2-bit 4 in 1, 3-bit 8 in 3, 4-bit 2 in 1, 8-bit 1 in 1."""
    codes = 8 // math.gcd(8, bits)
    return codes, codes * bits // 8


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes needed to pack `numel` codes of `bits` bits (the last unit is zero-padded)."""
    codes, nbytes = pack_unit(bits)
    return -(-numel // codes) * nbytes


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes in [0, 2^bits) densely into a flat uint8 tensor (little-endian within a unit)."""
    unit_codes, unit_bytes = pack_unit(bits)
    flat = codes.reshape(-1).to(torch.int32)
    pad = (-flat.numel()) % unit_codes
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    code_shifts = torch.arange(unit_codes, device=flat.device, dtype=torch.int32) * bits
    value = (flat.view(-1, unit_codes) << code_shifts).sum(dim=1, dtype=torch.int32)
    byte_shifts = torch.arange(unit_bytes, device=flat.device, dtype=torch.int32) * 8
    return ((value[:, None] >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of `pack_codes`: the first `numel` codes as a flat uint8 tensor."""
    unit_codes, unit_bytes = pack_unit(bits)
    byte_shifts = torch.arange(unit_bytes, device=packed.device, dtype=torch.int32) * 8
    value = (packed.view(-1, unit_bytes).to(torch.int32) << byte_shifts).sum(dim=1, dtype=torch.int32)
    code_shifts = torch.arange(unit_codes, device=packed.device, dtype=torch.int32) * bits
    codes = (value[:, None] >> code_shifts) & ((1 << bits) - 1)
    return codes.reshape(-1)[:numel].to(torch.uint8)
