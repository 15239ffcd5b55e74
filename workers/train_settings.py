"""Fine-tuning settings and the DeepSpeed config built from them.

`TrainSettings` maps one-to-one onto the `training:` block of a job spec; `AdapterSettings` onto the adapter
fields (rank, alpha, dropout, init). `deepspeed_config` is the only place a DeepSpeed config is written.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

from workers.messages import brief

ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16")
SCHEDULES = ("linear", "cosine", "constant")
INITS = ("loftq", "qlora")


@dataclass(frozen=True)
class TrainSettings:
    """The `training:` block of a job spec.

    The length of training is `max_steps` optimizer steps, or `epochs` passes over the training set: with
    `epochs` set, each worker derives max_steps = ceil(len(train) / (micro_batch_size * workers * grad_accum))
    * epochs once the data is loaded (`with_epoch_steps`), and the LR schedule, evaluation and checkpoint
    cadence follow that count. (Each worker drops its last incomplete micro batch of a pass, so a step near
    the end of an epoch may take its examples from the next, reshuffled pass.) Giving both is reported by
    `problems()` when max_steps differs from its default; a max_steps left at (or set to) the default 100 is
    ignored in favour of epochs.
    """

    zero_stage: int = 0
    precision: str = "fp32"
    activation_checkpointing: bool = False  # recompute each block's activations in backward: memory for compute
    micro_batch_size: int = 16
    grad_accum: int = 1
    max_steps: int = 100
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

    def problems(self, path: str = "training") -> list[str]:
        """Every invalid field, each as '<path>.<field>: expected ..., got ...'."""
        out = []
        if self.zero_stage not in ZERO_STAGES:
            out.append(f"{path}.zero_stage: expected one of {list(ZERO_STAGES)}, got {brief(self.zero_stage)}")
        if self.precision not in PRECISIONS:
            out.append(f"{path}.precision: expected one of {list(PRECISIONS)} (fp16 is not supported on the CPU), "
                       f"got {brief(self.precision)}")
        if not isinstance(self.activation_checkpointing, bool):
            out.append(f"{path}.activation_checkpointing: expected true or false, "
                       f"got {brief(self.activation_checkpointing)}")
        if self.schedule not in SCHEDULES:
            out.append(f"{path}.schedule: expected one of {list(SCHEDULES)}, got {brief(self.schedule)}")
        for name in ("micro_batch_size", "grad_accum", "max_steps", "report_every", "eval_every", "checkpoint_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                out.append(f"{path}.{name}: expected an integer >= 1, got {brief(value)}")
        for name in ("lr", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                out.append(f"{path}.{name}: expected a finite number >= 0, got {brief(value)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            out.append(f"{path}.warmup_steps: expected an integer >= 0, got {brief(self.warmup_steps)}")
        if self.epochs is not None:
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
                out.append(f"{path}.epochs: expected an integer >= 1 or null, got {brief(self.epochs)}")
            elif self.max_steps != DEFAULT_MAX_STEPS:
                out.append(f"{path}.epochs: give max_steps or epochs, not both (max_steps is {brief(self.max_steps)}, "
                           f"epochs {self.epochs})")
        return out

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "loftq"  # start from the cache entry's LoftQ factors, or QLoRA-style (random A, B = 0)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank else 1.0

    def problems(self, path: str = "adapter") -> list[str]:
        out = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            out.append(f"{path}.rank: expected an integer >= 1, got {brief(self.rank)}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            out.append(f"{path}.alpha: expected a number > 0, got {brief(self.alpha)}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            out.append(f"{path}.dropout: expected a number in [0, 1), got {brief(self.dropout)}")
        if self.init not in INITS:
            out.append(f"{path}.init: expected one of {list(INITS)}, got {brief(self.init)}")
        return out


DEFAULT_MAX_STEPS = TrainSettings.max_steps


def steps_per_epoch(num_train: int, settings: TrainSettings, world_size: int) -> int:
    """Optimizer steps in one pass over `num_train` examples: every step takes micro_batch * workers * grad_accum."""
    return max(1, math.ceil(num_train / (settings.micro_batch_size * world_size * settings.grad_accum)))


def with_epoch_steps(settings: TrainSettings, num_train: int, world_size: int) -> TrainSettings:
    """`settings` with max_steps derived from `epochs` (unchanged when epochs is not set)."""
    if settings.epochs is None:
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
