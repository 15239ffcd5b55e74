"""The key of a cache entry: everything a quantized base depends on, and the entry name derived from it."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from orchestrator.cache.errors import check_name, is_int
from workers.entry_format import ALL_METHODS, CALIBRATED_METHODS, FULL_PRECISION_METHOD

FORMAT_VERSION = 1


@dataclass(frozen=True)
class BaseCacheKey:
    """Everything a quantized base depends on. Equal keys have equal digests and names, and vice versa."""

    model: str  # readable model name, sanitized into the entry name
    fingerprint: str  # hex sha256 of the weight files (or of the config for config-built models)
    quant: dict  # the resolved quantization plan, JSON-able ({"bits": 16, "dtype": "bfloat16"} for the control)
    quant_label: str  # readable, e.g. "nf2-g64" (or "bf16")
    method: str  # "loftq" | "qlora" | "qalora", or "lora" for the full-precision control
    iters: int
    rank: int | None  # normalized to None when iters <= 1: the base does not depend on the rank then
    targets: tuple[str, ...]  # target module patterns, normalized to sorted and unique
    format_version: int = FORMAT_VERSION
    # a calibrated method's data ({"fingerprint", "samples", "max_length"}: CalibrationData.key_fields); None for
    # the other methods, whose digests (and so every existing entry's name) stay as they were without the field
    calibration: dict | None = None

    def __post_init__(self) -> None:
        for field_name in ("model", "fingerprint", "quant_label"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{field_name}: expected a non-empty string, got {value!r}")
        if self.method not in ALL_METHODS:
            raise ValueError(f"method: expected one of {list(ALL_METHODS)}, got {self.method!r}")
        if not is_int(self.iters) or self.iters < 0:
            raise ValueError(f"iters: expected an int >= 0, got {self.iters!r}")
        if self.method == FULL_PRECISION_METHOD and self.iters:
            raise ValueError(f"iters: the full-precision control (method 'lora') has no LoftQ iterations, "
                             f"got {self.iters!r}")
        if not is_int(self.format_version):
            raise ValueError(f"format_version: expected an int, got {self.format_version!r}")
        if self.iters > 1 and (not is_int(self.rank) or self.rank < 0):
            raise ValueError(f"rank: expected an int >= 0 when iters > 1, got {self.rank!r}")
        _check_calibration(self.method, self.calibration)
        # Frozen dataclass: normalized values are set through object.__setattr__.
        object.__setattr__(self, "rank", self.rank if self.iters > 1 else None)
        object.__setattr__(self, "quant", _canonical_quant(self.quant))
        object.__setattr__(self, "targets", _canonical_targets(self.targets))

    def __hash__(self) -> int:  # the generated hash would fail on the `quant` dict
        return hash(self.digest)

    def fields(self) -> dict[str, Any]:
        """All fields as a canonical JSON-able dict (a fresh copy)."""
        fields = {"model": self.model, "fingerprint": self.fingerprint, "quant": copy.deepcopy(self.quant),
                  "quant_label": self.quant_label, "method": self.method, "iters": self.iters, "rank": self.rank,
                  "targets": list(self.targets), "format_version": self.format_version}
        if self.calibration is not None:
            fields["calibration"] = dict(self.calibration)
        return fields

    @property
    def digest(self) -> str:
        """sha256 hex of the canonical JSON of `fields()`."""
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """The entry name, e.g. 'minilm-l6__nf2-g64__loftq-t5-r16__3f9c2a1b0c4d' (the full-precision control:
        'minilm-l6__bf16__lora__<digest>')."""
        run = f"{self.method}-t{self.iters}" + (f"-r{self.rank}" if self.rank is not None else "")
        run = FULL_PRECISION_METHOD if self.method == FULL_PRECISION_METHOD else run
        return f"{_readable(self.model, 64)}__{_readable(self.quant_label, 48)}__{run}__{self.digest[:12]}"


def name_of(key_or_name: BaseCacheKey | str) -> str:
    """The entry name of a key, or `key_or_name` itself once checked to be a plain name."""
    if isinstance(key_or_name, BaseCacheKey):
        return key_or_name.name
    return check_name(key_or_name, "entry name")


def _check_calibration(method: str, calibration: object) -> None:
    if method not in CALIBRATED_METHODS:
        if calibration is not None:
            raise ValueError(f"calibration: only a calibrated method ({list(CALIBRATED_METHODS)}) has calibration "
                             f"data; method {method!r} got {calibration!r}")
        return
    if not isinstance(calibration, dict) or set(calibration) != {"fingerprint", "samples", "max_length", "damping"}:
        raise ValueError(f"calibration: method {method!r} needs {{fingerprint, samples, max_length, damping}}, "
                         f"got {calibration!r}")
    if not (isinstance(calibration["fingerprint"], str) and re.fullmatch(r"[0-9a-f]{64}", calibration["fingerprint"])):
        raise ValueError(f"calibration.fingerprint: expected a sha256 hex digest, got {calibration['fingerprint']!r}")
    for name in ("samples", "max_length"):
        if not is_int(calibration[name]) or calibration[name] < 1:
            raise ValueError(f"calibration.{name}: expected an int >= 1, got {calibration[name]!r}")
    damping = calibration["damping"]
    if isinstance(damping, bool) or not isinstance(damping, int | float) or not damping > 0:
        raise ValueError(f"calibration.damping: expected a number > 0, got {damping!r}")


def _canonical_quant(quant: object) -> dict:
    # A JSON round trip both checks that the plan is JSON-able and turns tuples into lists, so a key built from
    # a plan equals the key read back from a manifest.
    if not isinstance(quant, dict):
        raise ValueError(f"quant: expected a dict, got {type(quant).__name__}")
    try:
        return json.loads(json.dumps(quant, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"quant: not JSON-able ({exc})") from None


def _canonical_targets(targets: object) -> tuple[str, ...]:
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):  # type: ignore[union-attr]
        raise ValueError(f"targets: expected a sequence of non-empty strings, got {targets!r}")
    if not targets:
        raise ValueError("targets: expected at least one module pattern")
    return tuple(sorted(set(targets)))  # type: ignore[arg-type]


def _readable(text: str, limit: int) -> str:
    """`text` as a lower-case [a-z0-9.-] name part, at most `limit` characters."""
    part = re.sub(r"[^a-z0-9.-]+", "-", text.lower())
    part = re.sub(r"\.{2,}", ".", part)[:limit].strip(".-")
    return part or "x"
