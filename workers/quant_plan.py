"""Which quantizer each target matrix gets: one spec for all, mixed precision, per-pattern overrides.

Resolution for a module, later rules winning:
1. the base spec;
2. mixed precision (the LoftQ paper's 2.5 / 2.25-bit models): blocks with index < `first_layers` get
   `first_bits` (e.g. the first 4 layers at 4 bits, the rest at 2);
3. overrides, in order: every override whose pattern matches replaces bits and/or group size.

The rules a quantization setting must follow live here once, each as a function that returns a neutral problem
(no spec path: the job spec, the command line and the builder each say where the value came from):
`bits_problem` (the bits a kind supports), `method_problem` (QA-LoRA needs an INT base), `max_rank` (the
largest LoRA rank a matrix holds).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from workers.entry_format import adapter_for
from workers.messages import brief
from workers.model_source import layer_index, module_matches
from workers.quant import ALLOWED_BITS, QuantSpec


def bits_problem(kind: str, bits: Any) -> str | None:
    """The problem with quantizing at `bits` with `kind` (mixed precision's bits, an override's), if any."""
    if bits in ALLOWED_BITS[kind] and not isinstance(bits, bool):
        return None
    return f"{kind} supports {list(ALLOWED_BITS[kind])}, got {brief(bits)}"


def method_problem(method: str, kind: str) -> str | None:
    """The problem with building a base with `method` over quantizer `kind`, if any: QA-LoRA only over INT."""
    if adapter_for(method) == "qalora" and kind != "int":
        return f"{method!r} needs kind 'int' (its QA-LoRA adapter merges into INT zero points), got {kind!r}"
    return None


def max_rank(shape: tuple[int, int], group_size: int | None, pooled: bool) -> int:
    """The largest LoRA rank an [out, in] matrix holds: min(out, in); a pooled (QA-LoRA) adapter's A has one
    column per quantization group, so min(out, in / group_size)."""
    rows, cols = shape
    return min(rows, cols // group_size if pooled and group_size else cols)


@dataclass(frozen=True)
class Override:
    """Bits and/or group size for the modules matching `pattern` (a name, dotted suffix or glob)."""

    pattern: str
    bits: int | None = None
    group_size: int | None = None


@dataclass(frozen=True)
class QuantPlan:
    base: QuantSpec
    first_layers: int = 0  # mixed precision: blocks [0, first_layers) use first_bits
    first_bits: int | None = None
    overrides: tuple[Override, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problem = None if self.first_bits is None else bits_problem(self.base.kind, self.first_bits)
        if problem:
            raise ValueError(f"QuantPlan.first_bits: {problem}")

    def spec_for(self, module: str) -> QuantSpec:
        """The QuantSpec for one module (raises ValueError naming the module for an invalid combination)."""
        spec = self.base
        index = layer_index(module)
        if self.first_bits is not None and index is not None and index < self.first_layers:
            spec = replace(spec, bits=self.first_bits)
        for o in self.overrides:
            if module_matches(module, o.pattern):
                spec = replace(spec, bits=o.bits or spec.bits, group_size=o.group_size or spec.group_size)
        return spec

    def problems(self, shapes: dict[str, tuple[int, ...]]) -> list[str]:
        """Every problem this plan has with these [out, in] target shapes, one message each (before any work)."""
        out = []
        for module, shape in shapes.items():
            try:
                spec = self.spec_for(module)
            except ValueError as exc:
                out.append(f"{module}: {exc}")
                continue
            if shape[1] % spec.group_size:
                out.append(f"{module}: shape {tuple(shape)} has in_features={shape[1]}, not divisible by "
                           f"group_size={spec.group_size}")
        return out

    @property
    def label(self) -> str:
        """Readable name for cache keys: `nf2-g64`, or `nf2-g64-first4x4` / `nf2-g64-ovr2` when mixed."""
        label = self.base.name
        if self.first_bits is not None and self.first_layers:
            label += f"-first{self.first_layers}x{self.first_bits}"
        if self.overrides:
            label += f"-ovr{len(self.overrides)}"
        return label

    def to_dict(self) -> dict:
        return {
            "kind": self.base.kind, "bits": self.base.bits, "group_size": self.base.group_size,
            "scale_dtype": self.base.scale_dtype, "first_layers": self.first_layers, "first_bits": self.first_bits,
            "overrides": [{"pattern": o.pattern, "bits": o.bits, "group_size": o.group_size} for o in self.overrides],
        }
