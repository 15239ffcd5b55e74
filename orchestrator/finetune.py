"""Launch one fine-tuning job on a cached base: a Ray Train TorchTrainer whose workers run DeepSpeed.

The driver reads the entry once and puts its tensors in the object store as raw bytes; every worker of the job
views them there without a copy (shared memory on one node, workers/shared_tensors.py), builds the model and
trains (workers/train_loop.py). A worker group that fails is restarted from the latest checkpoint
(FailureConfig), so the step count continues.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator.cache import BaseCache
from orchestrator.entry import read_model_inputs
from workers.shared_tensors import to_shared
from workers.train_loop import JobConfig, train_func


@dataclass(frozen=True)
class Resources:
    workers: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: int = 0


def make_trainer(job: JobConfig, resources: Resources, storage_path: str, name: str,
                 max_failures: int = 2, callbacks: list | None = None) -> TorchTrainer:
    """The TorchTrainer of one job (gloo on CPUs, NCCL on GPUs).

    A run with the same `name` under `storage_path` continues from that run's latest checkpoint.
    """
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = resources.gpus_per_worker
    return TorchTrainer(
        train_func,
        train_loop_config={"job": job},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=resources.workers, use_gpu=use_gpu, resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name, storage_path=os.path.abspath(storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks or [],
        ),
    )


def job_config(cache: BaseCache, entry: str, *, adapter, training, task, tokenizer_dir: str | None = None,
               threads_per_worker: int = 1, resume_from: str | None = None) -> JobConfig:
    """Read the entry once, put it in the object store, and describe the job for the workers.

    `resume_from`: a checkpoint folder to continue from (a fresh Train run has none of its own)."""
    # the driver verified the entry's hashes once per run: sizes are enough here
    inputs = read_model_inputs(cache, entry, rank=adapter.rank, init=adapter.init, verify=False)
    return JobConfig(model_config=inputs.model_config, base_ref=ray.put(to_shared(inputs.tensors)),
                     adapter_kind=inputs.adapter_kind, adapter=adapter, training=training, task=task,
                     tokenizer_dir=tokenizer_dir or inputs.model_path, threads_per_worker=threads_per_worker,
                     resume_from=resume_from, tokenizer_files=inputs.tokenizer_files or None)
