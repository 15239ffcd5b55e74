"""glibc's allocator settings for a training process.

glibc serves a large allocation from its heap once a freed block of that size has raised its dynamic mmap
threshold (up to 32 MiB), and heap memory is returned to the system only from the top. A training step frees
and reallocates transient tensors of tens of MB (dequantized weights, activations, logits chunks) in changing
order, so the heap fragments and the process keeps hundreds of MB it no longer uses: on the 7B-shaped bench
(BENCHMARKS.md section 3) the 4 x 256 checkpointed step's peak fell from 2111 to 1684 MiB with fixed thresholds.
Fixing the thresholds serves every large tensor with its own mapping, returned to the system when freed; the
price is page faults on every fresh mapping (the 1 x 256 step took 3.5 s instead of 2.1 s at 1 MiB, the 4 x 256
checkpointed one 13.1 s instead of 10.1 s at 8 MiB), so a worker pins them only when activation checkpointing
says memory comes first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
THRESHOLD_BYTES = 8 << 20


def pin_malloc_thresholds(threshold_bytes: int = THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap and trim thresholds for this process; False where there is no glibc (macOS, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, threshold_bytes))
