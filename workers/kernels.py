"""Triton dequantization kernel for packed 2/3/4/8-bit NF and INT matrices (a CUDA route of `quant.dequantize`).

`dequantize_triton(q, dtype, out=None)` gives bit for bit what `workers.quant.dequantize` gives: each weight is
the fp32 product codebook[c] * scale (INT: c * scale, then + zero, two roundings: the kernel is compiled with
fp fusion off so no FMA contracts them), rounded once (round to nearest even) to the output dtype.

Supported: kinds nf and int, bits 2, 3, 4 and 8 (the byte layouts of `quant_codes.pack_codes`, little-endian within
a unit: four, two and one codes per byte; 3 bits: eight codes in three bytes, so a code may straddle two bytes),
scales (and zeros) in fp16 / bf16 / fp32, output fp32 / bf16 / fp16. On CUDA, NF4 goes to bitsandbytes instead
where that is exact (`workers.bnb_nf4`); `quant.dequantize` chooses.

triton is imported lazily (on the first call), so this module imports without it. On the CPU the kernel runs
under `TRITON_INTERPRET=1` (set before triton is first imported), which is how tests/workers/test_kernels.py checks it.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache

import torch

from workers.quant import QuantizedTensor, _output_for
from workers.quant_codes import nf_codebook, pack_unit

KERNEL_BITS = (2, 3, 4, 8)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 1024


@cache
def triton_available() -> bool:
    """Whether triton can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("triton") is not None


def supports(q: QuantizedTensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the kernel handles this matrix (kinds nf/int at 2, 3, 4 or 8 bits), and output `dtype` if given."""
    if dtype is not None and dtype not in OUT_DTYPES:
        return False
    return q.spec.bits in KERNEL_BITS and q.spec.kind in ("nf", "int")


@cache
def _kernel(interpret: bool):
    """The jitted kernel; one per TRITON_INTERPRET setting (triton.jit reads it when it decorates)."""
    import triton
    import triton.language as tl

    @triton.jit
    def dequant_kernel(packed_ptr, scales_ptr, zeros_ptr, book_ptr, out_ptr, numel,
                       BITS: tl.constexpr, UNIT_CODES: tl.constexpr, UNIT_BYTES: tl.constexpr,
                       GROUP: tl.constexpr, IS_NF: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
        MASK: tl.constexpr = (1 << BITS) - 1
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < numel
        # code k of a unit holds bits [k * BITS, (k + 1) * BITS) of the unit's little-endian bytes
        bit = (offs % UNIT_CODES).to(tl.int32) * BITS
        byte_at = (offs // UNIT_CODES) * UNIT_BYTES + bit // 8
        shift = bit % 8
        word = tl.load(packed_ptr + byte_at, mask=valid, other=0).to(tl.int32)
        if UNIT_BYTES > 1:  # 3 bits: a code that starts at bit 6 or 7 of a byte ends in the next byte
            spill = valid & (shift + BITS > 8)
            word = word | (tl.load(packed_ptr + byte_at + 1, mask=spill, other=0).to(tl.int32) << 8)
        code = (word >> shift) & MASK
        group = offs // GROUP
        scale = tl.load(scales_ptr + group, mask=valid, other=0).to(tl.float32)
        if IS_NF:
            value = tl.load(book_ptr + code, mask=valid, other=0.0) * scale
        else:
            zero = tl.load(zeros_ptr + group, mask=valid, other=0).to(tl.float32)
            value = code.to(tl.float32) * scale
            value = value + zero
        if OUT_BF16:
            # fp32 -> bf16 round to nearest even in integer bits, as torch does (NaN stays a quiet NaN): the same
            # on CUDA and in the interpreter (whose own fp32 -> bf16 cast does not round to even); out is int16
            u = value.to(tl.uint32, bitcast=True)
            rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            is_nan = (u & 0x7FFFFFFF) > 0x7F800000
            bf16_bits = tl.where(is_nan, (u >> 16) | 0x40, rounded)
            tl.store(out_ptr + offs, bf16_bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
        else:
            tl.store(out_ptr + offs, value.to(out_ptr.dtype.element_ty), mask=valid)

    return triton, dequant_kernel


@cache
def _book(bits: int, device: str) -> torch.Tensor:
    return nf_codebook(bits).to(device)


def dequantize_triton(q: QuantizedTensor, dtype: torch.dtype = torch.float32,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """`quant.dequantize(q, dtype, out=out)` through the Triton kernel (bits 2, 3, 4, 8; see the module doc)."""
    if not supports(q):
        raise ValueError(f"dequantize_triton: {q.spec.name} is not supported (bits {list(KERNEL_BITS)}); "
                         "use workers.quant.dequantize")
    out = _output_for(q, dtype, out)
    if out.dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_triton: output dtype must be one of {OUT_DTYPES}, got {out.dtype}")
    numel = q.shape[0] * q.shape[1]
    if numel == 0:
        return out
    triton, kernel = _kernel(os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"))
    is_nf = q.spec.kind == "nf"
    device = q.packed.device
    book = _book(q.spec.bits, str(device)) if is_nf else q.scales  # an unused pointer for INT
    zeros = q.zeros if q.zeros is not None else q.scales  # an unused pointer for NF
    grid = (triton.cdiv(numel, BLOCK),)
    out_bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.int16) if out_bf16 else out
    unit_codes, unit_bytes = pack_unit(q.spec.bits)
    kernel[grid](q.packed, q.scales.contiguous(), zeros.contiguous(), book, target, numel,
                 BITS=q.spec.bits, UNIT_CODES=unit_codes, UNIT_BYTES=unit_bytes, GROUP=q.spec.group_size,
                 IS_NF=is_nf, OUT_BF16=out_bf16, BLOCK=BLOCK, enable_fp_fusion=False)
    return out
