#!/usr/bin/env bash
# The one command to run on a lent GPU machine (within 10 minutes): nvidia-smi, the `gpu` tests plus the Triton
# kernel tests, and a short CUDA dequantization benchmark (Triton kernel vs the torch path, GB/s of output).
# Outputs go under ${OUT:-bench/gpu-results}. Run from anywhere: bash bench/gpu_check.sh
#
# If the repo's venv is missing it is created with `pip install -e '.[dev]'`. Note: pyproject pins the CPU
# torch build of the build machines; the CUDA torch must come from the GPU machine itself (a preinstalled
# CUDA torch, e.g. a venv made with --system-site-packages, or a local wheel). The script checks
# torch.cuda.is_available() and stops with a clear message if not.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${OUT:-bench/gpu-results}"
mkdir -p "$RESULTS"
unset TRITON_INTERPRET

if [[ ! -x .venv/bin/python ]]; then
    python3 -m venv .venv
    .venv/bin/pip install -e '.[dev]'
fi
PY=.venv/bin/python

{ nvidia-smi || echo "nvidia-smi failed"; } 2>&1 | tee "$RESULTS/nvidia-smi.txt"

"$PY" - <<'PYEOF' 2>&1 | tee "$RESULTS/env.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if not torch.cuda.is_available():
    raise SystemExit("torch has no CUDA here: install the machine's CUDA torch into .venv first")
print("device", torch.cuda.get_device_name(0))
import triton
print("triton", triton.__version__)
PYEOF

status=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest-gpu.txt" || status=1
"$PY" -m pytest -q tests/test_kernels.py -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest-kernels.txt" || status=1

"$PY" - "$RESULTS/bench-dequant-cuda.json" <<'PYEOF' 2>&1 | tee "$RESULTS/bench-dequant-cuda.txt" || status=1
"""GB/s (output bytes) of the Triton kernel and the torch path on CUDA, 4096x11008 into bf16."""
import json
import statistics
import sys

import torch

from workers import kernels, quant
from workers.quant import QuantSpec, quantize

shape, dtype, repeats = (4096, 11008), torch.bfloat16, 20
w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
rows = []


def seconds(fn):
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


for spec in (QuantSpec("nf", 4, 64), QuantSpec("nf", 2, 64), QuantSpec("int", 4, 32)):
    q = quantize(w, spec).to("cuda")
    buf = torch.empty(shape, dtype=dtype, device="cuda")
    ref = quant.dequantize(q.to("cpu"), dtype)
    got = kernels.dequantize_triton(q, dtype, out=buf)
    assert torch.equal(got.cpu(), ref), spec.name
    # the torch path on CUDA: the body of quant.dequantize below its dispatch
    def torch_path(q=q, buf=buf):
        numel = q.shape[0] * q.shape[1]
        span = quant._span_numel(q.spec, numel, q.packed.device)
        work = quant._SpanWork(q, span, buf.dtype)
        for start in range(0, numel, span):
            work.run(start, min(span, numel - start), buf.view(-1))
    t_triton = seconds(lambda q=q, buf=buf: kernels.dequantize_triton(q, dtype, out=buf))
    t_torch = seconds(torch_path)
    gbytes = buf.numel() * buf.element_size() / 1e9
    row = {"shape": "x".join(map(str, shape)), "spec": spec.name, "dtype": "bf16",
           "triton_gbps": round(gbytes / t_triton, 1), "torch_gbps": round(gbytes / t_torch, 1),
           "triton_ms": round(t_triton * 1e3, 3), "torch_ms": round(t_torch * 1e3, 3),
           "speedup": round(t_torch / t_triton, 2)}
    rows.append(row)
    print(row, flush=True)

with open(sys.argv[1], "w") as f:
    json.dump({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows}, f, indent=1)
PYEOF

echo "results in $RESULTS (status $status)"
exit "$status"
