"""Fine-tuning settings and the DeepSpeed config built from them.

`TrainSettings` maps one-to-one onto the `training:` block of a job spec (None: not set); `AdapterSettings` is
what one trial's adapter is (the spec's `adapter:` block at the trial's rank). `with_epoch_steps` is the one
place the length of training is resolved; `deepspeed_config` the only place a DeepSpeed config is written.
Checks return (field, message) pairs: the caller knows where the settings came from and names the path.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from workers.messages import brief

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("linear", "cosine", "constant")
INITS = ("loftq", "qlora")
DEFAULT_MAX_STEPS = 100  # the length of training when neither max_steps nor epochs is set


@dataclass(frozen=True)
class TrainSettings:
    """The `training:` block of a job spec.

    The length of training is `max_steps` optimizer steps, or `epochs` passes over the training set, or
    DEFAULT_MAX_STEPS steps when neither is set (None: not set). With `epochs`, each worker derives max_steps =
    ceil(len(train) / (micro_batch_size * workers * grad_accum)) * epochs once the data is loaded
    (`with_epoch_steps`), and the LR schedule, evaluation and checkpoint cadence follow that count. (Each worker
    drops its last incomplete micro batch of a pass, so a step near the end of an epoch may take its examples
    from the next, reshuffled pass.) Setting both is an error that `problems()` reports, whatever the values:
    neither silently wins.
    """

    zero_stage: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: memory for compute
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int | None = None  # None: DEFAULT_MAX_STEPS, or derived from epochs
    epochs: int | None = None
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    schedule: str = "linear"
    grad_clip: float = 1.0
    report_every: int = 10
    eval_every: int = 50
    checkpoint_every: int = 50
    max_eval_batches: int | None = None
    seed: int = 0

    def problems(self) -> list[tuple[str, str]]:
        """Every invalid field, as (field, 'expected ..., got ...') pairs."""
        out = []
        if self.zero_stage not in ZERO_STAGES:
            out.append(("zero_stage", f"expected one of {list(ZERO_STAGES)}, got {brief(self.zero_stage)}"))
        if self.precision not in PRECISIONS:
            out.append(("precision", f"expected one of {list(PRECISIONS)} (fp16 is not supported on the CPU), "
                                     f"got {brief(self.precision)}"))
        if not isinstance(self.activation_checkpointing, bool):
            out.append(("activation_checkpointing",
                        f"expected true or false, got {brief(self.activation_checkpointing)}"))
        if self.schedule not in SCHEDULES:
            out.append(("schedule", f"expected one of {list(SCHEDULES)}, got {brief(self.schedule)}"))
        for name in ("micro_batch_size", "grad_accum", "max_steps", "report_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if value is None and name == "max_steps":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append((name, f"expected an integer >= 1, got {brief(value)}"))
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                out.append((name, f"expected a finite number >= 0, got {brief(value)}"))
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            out.append(("warmup_steps", f"expected an integer >= 0, got {brief(self.warmup_steps)}"))
        if self.epochs is not None:
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
                out.append(("epochs", f"expected an integer >= 1 or null, got {brief(self.epochs)}"))
            elif self.max_steps is not None:
                out.append(("epochs", f"give max_steps or epochs, not both (max_steps is {brief(self.max_steps)}, "
                                      f"epochs {self.epochs})"))
        return out


@dataclass(frozen=True)
class AdapterSettings:
    """One trial's adapter: the spec's `adapter:` block (alpha, dropout, init) at the trial's rank."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "loftq"  # start from the cache entry's LoftQ factors, or QLoRA-style (random A, B = 0)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0


def steps_per_epoch(num_train: int, settings: TrainSettings, world_size: int) -> int:
    """Optimizer steps in one pass over `num_train` examples: every step takes micro_batch * workers * grad_accum."""
    return max(1, math.ceil(num_train / (settings.micro_batch_size * world_size * settings.grad_accum)))


def with_epoch_steps(settings: TrainSettings, num_train: int | None = None, world_size: int = 1) -> TrainSettings:
    """`settings` with the max_steps it trains for: derived from `epochs` once `num_train` (the training set's
    size) is known, else the max_steps set, else DEFAULT_MAX_STEPS. The one place that default applies.

    With epochs and no `num_train` yet, max_steps stays None (unknown until the data is loaded). The result is
    derived settings, not a spec: with epochs it holds both fields.
    """
    if settings.epochs is None:
        steps = DEFAULT_MAX_STEPS if settings.max_steps is None else settings.max_steps
        return dataclasses.replace(settings, max_steps=steps)
    if num_train is None:
        return settings
    return dataclasses.replace(settings, max_steps=steps_per_epoch(num_train, settings, world_size) * settings.epochs)


def deepspeed_config(settings: TrainSettings) -> dict:
    """The DeepSpeed config for these settings (the optimizer and schedule are passed as objects)."""
    return {
        "train_micro_batch_size_per_gpu": settings.micro_batch_size,
        "gradient_accumulation_steps": settings.grad_accum,
        "gradient_clipping": settings.grad_clip,
        "zero_optimization": {"stage": settings.zero_stage},
        # a torch AdamW compiles no C++ op (DeepSpeed's FusedAdam costs ~33 s of gcc on first use)
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": settings.precision == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def lr_multiplier(settings: TrainSettings, step: int) -> float:
    """Warmup then linear / cosine decay to 0 at max_steps (or constant), as a factor on settings.lr."""
    if settings.warmup_steps and step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    if settings.schedule == "constant":
        return 1.0
    progress = (step - settings.warmup_steps) / max(1, settings.max_steps - settings.warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - progress if settings.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
