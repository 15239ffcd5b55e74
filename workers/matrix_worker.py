"""What one build actor does: LoftQ-quantize the matrices it is handed, on its GPU if it has one (or, for a
calibrated method such as cloq, the same alternation with the low-rank step weighted by the layer's input Gram
matrix, which the driver gathered and hands over with the weight).

The orchestrator wraps `MatrixWorker` in `ray.remote`; nothing here needs Ray (outside Ray, a result's `node`
is empty). Results are plain tensors named as they are stored in a cache entry (workers/entry_format.py):
the quantized base's parts and the LoftQ factors at LoRA scale 1, or the full-precision control's (bits 16) frozen
weight in bf16 (no quantization, no factors).
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import torch

from workers.cloq import DAMPING, WeightedStep, calibrated_init
from workers.entry_format import (
    CALIBRATED_METHODS,
    FULL_PRECISION_DTYPE_NAME,
    adapter_for,
    factor_names,
    fp_weight_name,
    qweight_tensors,
)
from workers.loftq import LoftQResult, adapter_delta, loftq_init
from workers.quant import QuantSpec, dequantize

FULL_PRECISION_DTYPE = getattr(torch, FULL_PRECISION_DTYPE_NAME)


@dataclass(frozen=True)
class MatrixJob:
    module: str
    spec: QuantSpec | None  # None: the full-precision control (the weight is kept in bf16)
    rank: int
    iters: int
    method: str = "loftq"
    seed: int = 0
    want_base: bool = True  # False: only the LoRA factors (another rank for a rank-independent base)
    damping: float | None = None  # a calibrated method's lambda (x mean diag of the Gram matrix)

    @property
    def matrix_seed(self) -> int:
        """A seed of this matrix alone, so results do not depend on which actor ran it or when."""
        return int(hashlib.sha256(f"{self.seed}:{self.module}".encode()).hexdigest()[:8], 16)


@dataclass
class MatrixResult:
    module: str
    tensors: dict[str, torch.Tensor]
    quant_error: float
    errors: list[float] = field(default_factory=list)  # cloq: output (weighted) errors, see workers/cloq.py
    seconds: float = 0.0
    device: str = "cpu"
    node: str = ""  # the Ray node that ran it (provenance for the manifest; never part of the cache key)
    # with a Gram matrix (calibration data was there): the final ||W - Q - BA|| / ||W|| and its output error
    # ||(W - Q - BA) R^T|| / ||W R^T||, for every method (a calibrated method's `errors` are output errors too)
    weight_error: float | None = None
    output_error: float | None = None


class MatrixWorker:
    """Runs LoftQ for one matrix at a time; pins its torch thread count so actors do not fight over cores."""

    def __init__(self, num_threads: int = 1):
        torch.set_num_threads(max(1, num_threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.node = _ray_node_id()

    def info(self) -> dict:
        return {"pid": os.getpid(), "device": str(self.device), "threads": torch.get_num_threads(),
                "node": self.node}

    def quantize(self, job: MatrixJob, weight: torch.Tensor, gram: torch.Tensor | None = None) -> MatrixResult:
        """Quantize one matrix as `job` says; `gram` is its input Gram matrix, which a calibrated method needs."""
        start = time.perf_counter()
        if job.spec is None:  # the bf16 control: the weight as it is trained on, exactly (error 0)
            name = fp_weight_name(job.module)
            tensors = {name: weight.to(FULL_PRECISION_DTYPE).contiguous()} if job.want_base else {}
            return MatrixResult(job.module, tensors, 0.0, [], time.perf_counter() - start, "cpu", self.node)
        weight = weight.to(self.device)
        gram = None if gram is None else gram.to(self.device)
        res = self._initialize(job, weight, gram)
        tensors: dict[str, torch.Tensor] = {}
        if job.want_base:
            parts = {part: t.cpu().contiguous() for part, t in res.quantized.state_dict().items()}
            tensors.update(qweight_tensors(job.module, parts))
        if job.iters > 0:  # QLoRA (iters 0) starts from random A and B = 0: nothing to store
            name_a, name_b = factor_names(job.module)
            tensors[name_a], tensors[name_b] = res.lora_A.cpu().contiguous(), res.lora_B.cpu().contiguous()
        weight_error, output_error = (None, None) if gram is None else final_errors(weight, res, gram, job)
        return MatrixResult(job.module, tensors, res.quant_error, res.errors, time.perf_counter() - start,
                            str(self.device), self.node, weight_error, output_error)

    def _initialize(self, job: MatrixJob, weight: torch.Tensor, gram: torch.Tensor | None) -> LoftQResult:
        """LoftQ (QLoRA at iters 0), or the calibrated step when the method has one."""
        adapter = adapter_for(job.method)
        if job.method not in CALIBRATED_METHODS:
            return loftq_init(weight, job.spec, job.rank, job.iters, scale=1.0, adapter=adapter, seed=job.matrix_seed)
        if gram is None:
            raise ValueError(f"{job.module}: method {job.method!r} needs the layer's input Gram matrix")
        return calibrated_init(weight, gram, job.spec, job.rank, job.iters, scale=1.0, svd="randomized",
                               adapter=adapter, damping=job.damping, seed=job.matrix_seed)


def final_errors(weight: torch.Tensor, res: LoftQResult, gram: torch.Tensor, job: MatrixJob) -> tuple[float, float]:
    """(weight error, output error) of the stored Q + BA (Q alone without factors), relative: the output error
    in the norm of workers/cloq.py, ||E R^T|| with R^T R = X^T X + the job's damping, so every method's entry
    is scored alike. A calibrated method has already measured it (its best iterate's error, the one stored): no
    second Cholesky factor."""
    approx = dequantize(res.quantized).float()
    if job.iters > 0:  # QLoRA stores no factors: it starts from Q
        approx = approx + adapter_delta(res.lora_A, res.lora_B, res.scale, adapter_for(job.method),
                                        job.spec.group_size)
    w = weight.float()
    weight_error = (torch.linalg.vector_norm(w - approx) / torch.linalg.vector_norm(w)).item()
    if job.method in CALIBRATED_METHODS:
        return weight_error, min(res.errors)
    step = WeightedStep(gram, 1, DAMPING if job.damping is None else job.damping)
    return weight_error, step.norm(w - approx) / (step.norm(w) or 1.0)


def _ray_node_id() -> str:
    """The id of the Ray node this process runs on, or "" outside Ray."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # provenance only: never fail a build over it
        return ""
