"""NF4 matrices through bitsandbytes' 4-bit kernels (the CUDA NF4 route of `quant.dequantize`), where exact.

`bnb_supports(q)` says whether `dequantize` may take this route; `dequantize_bnb(q, dtype, out=None)` gives bit
for bit what `workers.quant.dequantize` gives. The route is taken only when loftune's layout converts EXACTLY
to bitsandbytes' (0.50.2, read in its source and checked by tests/workers/test_bnb_nf4.py):

- codes: uint8, two per byte, the FIRST code in the HIGH nibble (`out_dq[::2] = A >> 4` in
  backends/default/ops.py; the CUDA kernel takes `qvals[j] >> 4` first). loftune puts the first code in the LOW
  nibble, so the conversion swaps the nibbles of every byte. Shape [(n + 1) // 2, 1], as `quantize_4bit` makes.
- absmax: float32 (`_ops.py` checks `absmax.dtype == torch.float32`), one per block of `blocksize` consecutive
  weights of the FLATTENED tensor. loftune's groups are runs of group_size along each row of [out, in] with
  in % group_size == 0, so group k of the row-major scales is block k: absmax = scales.float().view(-1), exact
  for fp16 / bf16 / fp32 scales.
- blocksize in BNB_BLOCKSIZES (the checks of `quantize_4bit` / `dequantize_4bit`); quant_type "nf4".
- values: the fp32 product table[c] * absmax rounded once to the output dtype (fp32 / bf16 / fp16), as
  `quant.dequantize` does; table is bnb's own NF4 table (`get_4bit_type("nf4")`: the same 16 float32 lie in
  the CUDA library; the kernel ignores QuantState.code). So the route is exact only when `nf_codebook(4)`
  equals that table float for float, which `exact_reason` checks (never assumed). When this was written it
  did not: loftune builds the codebook in float64, bnb (QLoRA's create_normal_map) spaces the quantiles in
  float32 and normalizes in float32, and 12 of the 16 entries differ by 1 to 6 ulps. While they differ the
  route is never taken and NF4 goes through the Triton kernel.
- bitsandbytes' CUDA library is built with --use_fast_math, so fp32 subnormals flush to zero: matrices with a
  nonzero |scale| below MIN_SCALE (whose products could be subnormal) or a non-finite scale are refused (so are
  matrices of more than MAX_NUMEL weights: the CUDA launcher takes the count as an int32).

Memory (the choice): bnb's codes are a second copy of the packed codes (n / 2 bytes, plus fp32 absmax: twice
fp16 scales). By default nothing is kept: `dequantize_bnb` converts into transients freed on return (one pass
over the codes: n / 2 bytes read and written, against the 2n bytes a bf16 dequantization writes). `prepare(q)`
converts once and keeps the buffers while q lives, for a caller that would rather spend that memory (about
the size of q again) than the pass. Entries are keyed weakly (dropped with q) and remade when q's tensors are
replaced or written in place. The exactness verdict, which reads the scales once (a device sync on CUDA), is
cached the same way whether or not the buffers are kept.

bitsandbytes is imported lazily: only on CUDA (`bnb_supports`) or when a test or benchmark calls in directly.
"""

from __future__ import annotations

import importlib.util
import weakref
from dataclasses import dataclass
from functools import cache

import torch

from workers.quant import QuantizedTensor, _output_for
from workers.quant_codes import nf_codebook

BNB_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The smallest nonzero |NF4 value| is 0.0796 > 2^-4, so |scale| >= 2^-122 keeps every nonzero product at or
# above 2^-126, the smallest normal fp32: nothing that fast math would flush to zero.
MIN_SCALE = 2.0**-122
MAX_NUMEL = 2**31 - 1  # backends/cuda/ops.py hands the element count to the kernel as a ctypes c_int32


@dataclass
class BnbNF4:
    """A matrix in bitsandbytes' 4-bit layout: packed codes (bnb nibble order) and float32 absmax."""

    packed: torch.Tensor  # uint8 [(n + 1) // 2, 1], the first code of each byte in its high nibble
    absmax: torch.Tensor  # float32 [n // blocksize]
    blocksize: int
    shape: tuple[int, int]

    def quant_state(self, dtype: torch.dtype = torch.bfloat16):
        """A `bitsandbytes.functional.QuantState` describing these buffers, dequantizing to `dtype`."""
        from bitsandbytes.functional import QuantState

        return QuantState(absmax=self.absmax, shape=torch.Size(self.shape), code=_bnb_table(str(self.packed.device)),
                          blocksize=self.blocksize, quant_type="nf4", dtype=dtype)


@cache
def bnb_available() -> bool:
    """Whether bitsandbytes can be imported (checked once, without importing it)."""
    return importlib.util.find_spec("bitsandbytes") is not None


@cache
def _bnb_cuda_ready() -> bool:
    """Whether bitsandbytes loaded its CUDA library (not ROCm: its build is unverified here)."""
    if not (bnb_available() and torch.cuda.is_available()) or torch.version.hip is not None:
        return False
    try:
        from bitsandbytes.cextension import CudaBNBNativeLibrary, lib
    except Exception:  # a broken install must leave dequantize on its other routes, not break it
        return False
    return isinstance(lib, CudaBNBNativeLibrary)


@cache
def _bnb_table(device: str) -> torch.Tensor:
    from bitsandbytes.functional import get_4bit_type

    return get_4bit_type("nf4", device=device)


@cache
def codebook_matches() -> bool:
    """Whether loftune's NF4 codebook equals bitsandbytes' NF4 table bit for bit (False without bitsandbytes)."""
    if not bnb_available():
        return False
    ours, theirs = nf_codebook(4), _bnb_table("cpu")
    return ours.shape == theirs.shape and torch.equal(ours.view(torch.int32), theirs.float().view(torch.int32))


def _static_reason(q: QuantizedTensor) -> str | None:
    """Why the layout of q does not convert exactly (kind, bits, block size, codebook), or None."""
    spec = q.spec
    if spec.kind != "nf" or spec.bits != 4:
        return f"{spec.name} is not NF4"
    if spec.group_size not in BNB_BLOCKSIZES:
        return f"group size {spec.group_size} is not a bitsandbytes blocksize {list(BNB_BLOCKSIZES)}"
    if q.shape[1] % spec.group_size:
        return f"in_features {q.shape[1]} is not a multiple of the group size (groups would cross rows)"
    if q.shape[0] * q.shape[1] > MAX_NUMEL:
        return f"{q.shape[0] * q.shape[1]} weights: bnb's CUDA launcher passes the count as int32"
    if not bnb_available():
        return "bitsandbytes is not installed"
    if not codebook_matches():
        return "loftune's NF4 codebook differs from bitsandbytes' NF4 table"
    return None


def _scales_reason(scales: torch.Tensor) -> str | None:
    """Why these scales would not dequantize exactly under fast math (non-finite, or tiny), or None."""
    s = scales.float().abs()
    ok = torch.isfinite(s) & ((s == 0) | (s >= MIN_SCALE))
    if not bool(ok.all()):  # one sync, cached per matrix by _entry
        return f"a scale is non-finite or nonzero below {MIN_SCALE:.3g} (bitsandbytes flushes subnormals)"
    return None


@dataclass
class _Entry:
    """What is known about one QuantizedTensor: its verdict, and its converted buffers once prepared."""

    packed: weakref.ref  # the tensors the verdict was made from: a replaced one makes the entry stale
    scales: weakref.ref
    stamp: tuple  # their in-place write counters, spec and shape: any change makes the entry stale
    reason: str | None
    converted: BnbNF4 | None = None

    def fresh(self, q: QuantizedTensor) -> bool:
        return self.packed() is q.packed and self.scales() is q.scales and self.stamp == _stamp(q)


def _stamp(q: QuantizedTensor) -> tuple:
    # torch's _version counts in-place writes to a tensor (autograd relies on it)
    return q.packed._version, q.scales._version, q.spec, tuple(q.shape)


_entries: dict[int, _Entry] = {}  # by id(q); a weakref.finalize on q removes its entry when q is collected


def _entry(q: QuantizedTensor) -> _Entry:
    entry = _entries.get(id(q))
    if entry is not None and entry.fresh(q):
        return entry
    if entry is None:
        weakref.finalize(q, _entries.pop, id(q), None)
    was_prepared = entry is not None and entry.converted is not None
    reason = _static_reason(q) or _scales_reason(q.scales)
    entry = _Entry(weakref.ref(q.packed), weakref.ref(q.scales), _stamp(q), reason)
    if was_prepared and reason is None:  # a prepared matrix stays prepared across a change of its tensors
        entry.converted = convert_layout(q)
    _entries[id(q)] = entry
    return entry


def exact_reason(q: QuantizedTensor) -> str | None:
    """Why q does not convert exactly to bitsandbytes' NF4 layout, or None when it does (any device)."""
    return _entry(q).reason


def bnb_supports(q: QuantizedTensor, dtype: torch.dtype | None = None) -> bool:
    """Whether `dequantize` takes the bitsandbytes route: a CUDA tensor, bnb's CUDA library, an exact conversion
    (`exact_reason`), and an output dtype (when given) bnb writes (fp32 / bf16 / fp16)."""
    if q.packed.device.type != "cuda" or (dtype is not None and dtype not in OUT_DTYPES):
        return False
    if q.spec.kind != "nf" or q.spec.bits != 4:  # before the cache: other matrices get no entry
        return False
    return _bnb_cuda_ready() and exact_reason(q) is None


def convert_layout(q: QuantizedTensor) -> BnbNF4:
    """q's codes and scales in bitsandbytes' 4-bit layout, on q's device, WITHOUT the exactness checks: bench
    and test use; `prepare` and `dequantize_bnb` check first. Fp32 scales are shared, not copied."""
    swapped = torch.bitwise_left_shift(q.packed, 4)  # uint8: the old high nibble falls off
    swapped |= q.packed >> 4
    absmax = q.scales.reshape(-1).float()
    return BnbNF4(swapped.view(-1, 1), absmax, q.spec.group_size, tuple(q.shape))


def prepare(q: QuantizedTensor) -> BnbNF4 | None:
    """Convert q once and keep the buffers while q lives (about q's size again); None if it is not exact."""
    entry = _entry(q)
    if entry.reason is not None:
        return None
    if entry.converted is None:
        entry.converted = convert_layout(q)
    return entry.converted


def dequantize_converted(converted: BnbNF4, out: torch.Tensor) -> torch.Tensor:
    """Run bitsandbytes' `dequantize_4bit` on converted buffers into `out` (contiguous, of their shape)."""
    from bitsandbytes.functional import dequantize_4bit

    state = converted.quant_state(out.dtype)
    if out.device.type == "cuda":
        dequantize_4bit(converted.packed, state, out=out)
    else:  # bnb registers the out= variant for CUDA / XPU only
        out.copy_(dequantize_4bit(converted.packed, state))
    return out


def dequantize_bnb(q: QuantizedTensor, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """`quant.dequantize(q, dtype, out=out)` through bitsandbytes' NF4 kernel (any device bnb runs on).

    Uses the buffers of `prepare(q)` when there are some, else converts into transients for this call.
    Raises ValueError when q does not convert exactly (see `exact_reason`).
    """
    entry = _entry(q)
    if entry.reason is not None:
        raise ValueError(f"dequantize_bnb: {q.spec.name} does not convert exactly to bitsandbytes NF4: "
                         f"{entry.reason}; use workers.quant.dequantize")
    out = _output_for(q, dtype, out)
    if out.dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_bnb: output dtype must be one of {OUT_DTYPES}, got {out.dtype}")
    if out.numel() == 0:
        return out
    return dequantize_converted(entry.converted or convert_layout(q), out)
