"""The job spec's `quantization:` section and its sub-sections (mixed precision, overrides, calibration), with the
checks each makes of its own fields; orchestrator/spec.py assembles the whole spec from them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.errors import Problem
from workers.calibration import DEFAULT_MAX_LENGTH, DEFAULT_SAMPLES, damping_problem
from workers.cloq import DAMPING
from workers.entry_format import FULL_PRECISION_BITS, METHODS
from workers.messages import brief
from workers.quant import ALLOWED_BITS, SCALE_DTYPES
from workers.quant_plan import bits_problem, method_problem


def at_path(path: str, problem: str | None) -> list[Problem]:
    return [Problem(path, problem)] if problem else []


def at_least(path: str, value: Any, low: int) -> list[Problem]:
    return [] if value is None or value >= low else [Problem(path, f"expected an integer >= {low}, got {brief(value)}")]


@dataclass(frozen=True)
class Mixed:
    first_layers: int = 0
    bits: int = 4


@dataclass(frozen=True)
class Calibration:
    """`quantization.calibration`: the texts a calibrated method (cloq) weights its low-rank step with. Left out,
    or without `file`: the first task's training rows (prompt and answer for a prompt_answer task, else its text
    columns), never its evaluation rows."""

    file: str | None = None
    column: str | None = None  # with `file`; default 'text'
    samples: int = DEFAULT_SAMPLES
    max_length: int = DEFAULT_MAX_LENGTH  # tokens per text
    damping: float = DAMPING  # the weighted step's lambda, x mean(diag(X^T X)) (docs/methods.md: why 1)

    def problems(self, path: str) -> list[Problem]:
        out = at_least(f"{path}.samples", self.samples, 1) + at_least(f"{path}.max_length", self.max_length, 1)
        out += at_path(f"{path}.damping", damping_problem(self.damping))
        if self.column is not None and self.file is None:
            out.append(Problem(f"{path}.column", "goes with calibration.file (a task's data has its own columns)"))
        return out


@dataclass(frozen=True)
class OverrideSpec:
    pattern: str = ""
    bits: int | None = None
    group_size: int | None = None


def method_problems(path: str, kind: str, method: Any) -> list[Problem]:
    """A quantization method: one of METHODS, and one the quantizer kind allows (`method_problem`)."""
    if method not in METHODS:
        return [Problem(path, f"expected one of {list(METHODS)}, got {brief(method)}")]
    return at_path(path, method_problem(method, kind))


def bits_problems(where: str, kind: str, bits: Any) -> list[Problem]:
    """The problem with a trial's `bits` (quantization.bits, sweep.bits[i]), if any: it must be one of the kind's
    bits, or 16 (the full-precision control: LoRA over the bf16 base)."""
    if bits == FULL_PRECISION_BITS or bits in ALLOWED_BITS[kind]:
        return []
    return [Problem(where, f"{kind} supports {list(ALLOWED_BITS[kind])}, or {FULL_PRECISION_BITS} (LoRA over the "
                           f"bf16 base), got {brief(bits)}")]


@dataclass(frozen=True)
class Quantization:
    """The `quantization:` block. `bits: 16` is the full-precision control: plain LoRA over the bf16 base, to which
    kind, group_size, scale_dtype, method, iters, mixed and overrides do not apply."""

    kind: str = "nf"
    bits: int = 4
    group_size: int = 64
    scale_dtype: str = "float16"
    method: str = "loftq"
    rank: int = 16
    iters: int = 5
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    mixed: Mixed | None = None
    overrides: list[OverrideSpec] = field(default_factory=list)
    calibration: Calibration | None = None  # method cloq only

    def problems(self, path: str = "quantization") -> list[Problem]:
        if self.kind not in ALLOWED_BITS:
            return [Problem(f"{path}.kind", f"expected one of {sorted(ALLOWED_BITS)}, got {brief(self.kind)}")]
        out = bits_problems(f"{path}.bits", self.kind, self.bits)
        out += at_least(f"{path}.group_size", self.group_size, 1)
        if self.scale_dtype not in SCALE_DTYPES:
            out.append(Problem(f"{path}.scale_dtype",
                               f"expected one of {sorted(SCALE_DTYPES)}, got {brief(self.scale_dtype)}"))
        out += method_problems(f"{path}.method", self.kind, self.method)
        out += at_least(f"{path}.rank", self.rank, 1) + at_least(f"{path}.iters", self.iters, 0)
        if not self.targets:
            out.append(Problem(f"{path}.targets", "expected at least one module pattern or 'all-linear'"))
        if self.mixed is not None:
            out += at_path(f"{path}.mixed.bits", bits_problem(self.kind, self.mixed.bits))
        if self.calibration is not None:
            out += self.calibration.problems(f"{path}.calibration")
        for i, o in enumerate(self.overrides):
            if not o.pattern:
                out.append(Problem(f"{path}.overrides[{i}].pattern", "expected a module name, suffix or glob"))
            if o.bits is not None:
                out += at_path(f"{path}.overrides[{i}].bits", bits_problem(self.kind, o.bits))
        return out
