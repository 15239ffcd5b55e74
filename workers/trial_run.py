"""What the steps of one training job share on a worker, carried as one value instead of long argument lists."""

from __future__ import annotations

from dataclasses import dataclass

from workers.train_settings import TrainSettings


@dataclass
class TrialRun:
    """One worker's view of a running trial: built once in `train_loop.train_func`, read by every step."""

    engine: object  # the deepspeed engine (engine.module is the task model)
    scheduler: object  # the learning-rate scheduler that deepspeed steps
    data: object  # workers.tasks.TaskData: train / eval splits, collate, num_labels, eval answers
    tokenizer: object
    task: object  # workers.tasks.TaskSpec
    settings: TrainSettings  # with max_steps resolved from epochs
    rank: int
    world: int
