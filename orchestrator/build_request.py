"""What a build is asked for and what it returns: light types (no Ray), shared by the planner and the builder.

`BuildRequest.key()` is the content address of the base it describes (orchestrator.cache.BaseCacheKey).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.cache import BaseCacheKey
from workers.calibration import CalibrationData
from workers.entry_format import (
    CALIBRATED_METHODS,
    FULL_PRECISION_BITS,
    FULL_PRECISION_DTYPE_NAME,
    FULL_PRECISION_METHOD,
)
from workers.model_source import ModelSource
from workers.quant_plan import QuantPlan

# The key's quantization of the full-precision control: no quantizer kind, group size or scale dtype apply to it.
FULL_PRECISION_QUANT = {"bits": FULL_PRECISION_BITS, "dtype": FULL_PRECISION_DTYPE_NAME}


class BuildInputError(ValueError):
    """The request cannot be built as asked (raised before any work starts)."""


@dataclass(frozen=True)
class BuildRequest:
    """One quantized base: a model, a quantization plan, the method, and the LoftQ rank and iterations.

    `plan` None with method 'lora' is the full-precision control (bits 16): its entry holds the target weights in
    bf16 (no codes, no factors, error 0), built through the same actors. `full_precision` makes one.
    A calibrated method (cloq) needs `calibration`, the texts whose layer inputs weight its low-rank step; their
    fingerprint is part of the key. Any other quantized method may take it too: it then only scores the base (each
    matrix's output error on those inputs goes into the manifest) and stays out of the key, since it does not
    change a single stored byte.
    """

    source: ModelSource
    plan: QuantPlan | None
    method: str = "loftq"
    rank: int = 16
    iters: int = 1
    targets: tuple[str, ...] = ("all-linear",)
    seed: int = 0
    calibration: CalibrationData | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.method in CALIBRATED_METHODS and self.calibration is None:
            raise BuildInputError(f"calibration: method {self.method!r} needs calibration data (texts whose layer "
                                  f"inputs weight its low-rank step)")
        if self.plan is None and self.calibration is not None:
            raise BuildInputError("calibration: the full-precision control (bits 16) takes none: it has no "
                                  "quantization error to score")

    @property
    def calibrated(self) -> bool:
        """Whether the calibration data shapes the base (a calibrated method), not only scores it."""
        return self.method in CALIBRATED_METHODS

    @classmethod
    def full_precision(cls, source: ModelSource, *, rank: int = 16, targets: tuple[str, ...] = ("all-linear",),
                       seed: int = 0) -> BuildRequest:
        """The bf16 base of the full-precision control: plain LoRA trains over it."""
        return cls(source, None, method=FULL_PRECISION_METHOD, rank=rank, iters=0, targets=targets, seed=seed)

    @property
    def is_full_precision(self) -> bool:
        return self.plan is None

    @property
    def label(self) -> str:
        """Readable quantization: 'nf2-g64' (QuantPlan.label), or 'bf16' for the full-precision control."""
        return "bf16" if self.plan is None else self.plan.label

    @property
    def effective_iters(self) -> int:
        """QLoRA is LoftQ with no alternation: its base is plain quantization whatever `iters` says (and the
        full-precision control has no quantization to alternate with)."""
        return 0 if self.method in ("qlora", FULL_PRECISION_METHOD) else self.iters

    def key(self) -> BaseCacheKey:
        quant = FULL_PRECISION_QUANT if self.plan is None else self.plan.to_dict()
        return BaseCacheKey(model=self.source.name, fingerprint=self.source.fingerprint, quant=quant,
                            quant_label=self.label, method=self.method, iters=self.effective_iters,
                            rank=self.rank, targets=tuple(sorted(self.targets)),
                            calibration=self.calibration.key_fields() if self.calibrated else None)

    @property
    def stores_factors(self) -> bool:
        return self.effective_iters > 0 and self.rank > 0


@dataclass
class BuildResult:
    name: str
    uri: str
    built: bool  # False on a cache hit
    seconds: float
    manifest: dict = field(repr=False, default_factory=dict)
    repaired: list[str] = field(default_factory=list)  # the problems that made the entry be rebuilt; [] otherwise
