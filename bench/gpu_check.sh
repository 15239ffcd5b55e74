#!/usr/bin/env bash
# The one command to run on a lent GPU machine (within 10 minutes): nvidia-smi, the `gpu` tests plus the Triton
# kernel and bitsandbytes NF4 tests, a probe of bnb's CUDA kernel (does it flush fp32 subnormals?), and a short
# CUDA dequantization benchmark: the bnb / Triton / torch routes, GB/s of output.
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
try:
    import bitsandbytes
    from bitsandbytes.cextension import lib
    print("bitsandbytes", bitsandbytes.__version__, type(lib).__name__)
except Exception as exc:  # the bnb route is then off; the rest still runs
    print("bitsandbytes unavailable:", exc)
PYEOF

status=0
"$PY" -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tee "$RESULTS/pytest-gpu.txt" || status=1
"$PY" -m pytest -q tests/workers/test_kernels.py tests/workers/test_bnb_nf4.py -p no:cacheprovider 2>&1 \
    | tee "$RESULTS/pytest-kernels.txt" || status=1

"$PY" - <<'PYEOF' 2>&1 | tee "$RESULTS/bnb-ftz-probe.txt" || status=1
"""Does bnb's CUDA NF4 kernel flush fp32 subnormal products to zero (its --use_fast_math build)? If it does not,
workers/bnb_nf4.py's refusal of scales below MIN_SCALE is only conservative."""
import bitsandbytes.functional as F
import torch

from workers import bnb_nf4
from workers.quant import QuantSpec, quantize

w = torch.randn(4, 256, generator=torch.Generator().manual_seed(0)) * 1e-38
q = quantize(w, QuantSpec("nf", 4, 64, "bfloat16"))
print("exact_reason:", bnb_nf4.exact_reason(q))
book = F.get_4bit_type("nf4", device="cpu")
expected = (book[q.codes().long()].view(-1, 64) * q.scales.float().view(-1, 1)).view(q.shape)
got = bnb_nf4.dequantize_converted(bnb_nf4.convert_layout(q.to("cuda")), torch.empty(q.shape, device="cuda")).cpu()
subnormal = (expected != 0) & (expected.abs() < torch.finfo(torch.float32).tiny)
print("subnormal products:", int(subnormal.sum()), "flushed to zero by bnb:", int((got[subnormal] == 0).sum()),
      "other values equal:", bool(torch.equal(got[~subnormal], expected[~subnormal])))
PYEOF

"$PY" - "$RESULTS/bench-dequant-cuda.json" <<'PYEOF' 2>&1 | tee "$RESULTS/bench-dequant-cuda.txt" || status=1
"""GB/s (output bytes) of each CUDA dequantization route on 4096x11008 into bf16: bitsandbytes' NF4 kernel on
buffers converted once (`bnb`, what `bnb_nf4.prepare` keeps) and converted per call (`bnb+conv`, what
`dequantize_bnb` does unprepared), the Triton kernel, and the torch path. `route` is what `quant.dequantize` picks;
`exact` whether a route's bits equal the CPU torch path (bnb: False while loftune's NF4 codebook differs from bnb's
table). BENCH_SHAPE=RxC overrides the shape; on a CPU (a dry run, with TRITON_INTERPRET=1) it times with
perf_counter."""
import json
import os
import statistics
import sys
import time

import torch

from workers import bnb_nf4, kernels, quant
from workers.quant import QuantSpec, quantize

cuda = torch.cuda.is_available()
device = "cuda" if cuda else "cpu"
shape = tuple(int(x) for x in os.environ.get("BENCH_SHAPE", "4096x11008").split("x"))
dtype, repeats = torch.bfloat16, 20 if cuda else 2
w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def seconds(fn):
    """Median seconds of fn (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if not cuda:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
            continue
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def torch_path(q, buf):
    """The body of quant.dequantize below its dispatch."""
    numel = q.shape[0] * q.shape[1]
    span = quant._span_numel(q.spec, numel, q.packed.device)
    work = quant._SpanWork(q, span, buf.dtype)
    for start in range(0, numel, span):
        work.run(start, min(span, numel - start), buf.view(-1))
    return buf


def routes(q, buf):
    found = {"torch": lambda: torch_path(q, buf)}
    if kernels.triton_available() and kernels.supports(q, dtype):
        found["triton"] = lambda: kernels.dequantize_triton(q, dtype, out=buf)
    if q.spec.kind == "nf" and q.spec.bits == 4 and q.spec.group_size in bnb_nf4.BNB_BLOCKSIZES \
            and bnb_nf4.bnb_available():
        kept = bnb_nf4.convert_layout(q)
        found["bnb"] = lambda: bnb_nf4.dequantize_converted(kept, buf)
        found["bnb+conv"] = lambda: bnb_nf4.dequantize_converted(bnb_nf4.convert_layout(q), buf)
    return found


rows = []
gbytes = shape[0] * shape[1] * torch.tensor([], dtype=dtype).element_size() / 1e9
for spec in (QuantSpec("nf", 4, 64), QuantSpec("nf", 2, 64), QuantSpec("nf", 3, 64), QuantSpec("int", 4, 32),
             QuantSpec("int", 3, 32)):
    q_cpu = quantize(w, spec)
    ref = quant.dequantize(q_cpu, dtype)
    q = q_cpu.to(device)
    buf = torch.empty(shape, dtype=dtype, device=device)
    route = "bnb" if bnb_nf4.bnb_supports(q, dtype) else "triton" if cuda and kernels.supports(q, dtype) else "torch"
    row = {"shape": "x".join(map(str, shape)), "spec": spec.name, "dtype": "bf16", "route": route}
    if spec.kind == "nf" and spec.bits == 4:
        row["bnb_refused"] = bnb_nf4.exact_reason(q)
    for name, fn in routes(q, buf).items():
        buf.zero_()
        row[f"{name}_exact"] = bool(torch.equal(fn().cpu(), ref))
        t = seconds(fn)
        row[f"{name}_ms"], row[f"{name}_gbps"] = round(t * 1e3, 3), round(gbytes / t, 1)
    rows.append(row)
    print(row, flush=True)

with open(sys.argv[1], "w") as f:
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=1)
PYEOF

echo "results in $RESULTS (status $status)"
exit "$status"
