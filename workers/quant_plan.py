"""Which quantizer each target matrix gets: one spec for all, mixed precision, per-pattern overrides.

Resolution for a module, later rules winning:
1. the base spec;
2. mixed precision (the LoftQ paper's 2.5 / 2.25-bit models): blocks with index < `first_layers` get
   `first_bits` (e.g. the first 4 layers at 4 bits, the rest at 2);
3. overrides, in order: every override whose pattern matches replaces bits and/or group size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from workers.model_source import layer_index, module_matches
from workers.quant import ALLOWED_BITS, QuantSpec


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
        if self.first_bits is not None and self.first_bits not in ALLOWED_BITS[self.base.kind]:
            out.append(f"quantization.mixed.bits: {self.base.kind} supports {list(ALLOWED_BITS[self.base.kind])}, "
                       f"got {self.first_bits}")
            return out
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
