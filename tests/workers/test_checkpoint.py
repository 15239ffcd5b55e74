"""Checkpoints restore the optimizer: real DeepSpeed engines (one gloo process) at ZeRO 0-3, fp32 and bf16.

A checkpoint saved after a few steps is loaded into a freshly built engine; both engines then take the
same steps and must end with the same adapters. A checkpoint without its optimizer partition (the old
format, or a changed world size) resumes with fresh AdamW moments, and that run visibly diverges: the
comparison is sharp enough to tell the two apart.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from workers.checkpoint import OPTIMIZER_FILE, inner_optimizer, load_checkpoint, save_checkpoint, trainable_state
from workers.matrix_worker import MatrixJob, MatrixWorker
from workers.quant import QuantSpec
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings, TrainSettings, deepspeed_config

os.environ.setdefault("DS_ACCELERATOR", "cpu")
CONFIG = transformers.BertConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def entry_tensors() -> dict[str, torch.Tensor]:
    """A tiny BERT's tensors with its encoder linears NF4-quantized with LoftQ factors (a cache entry's layout)."""
    torch.manual_seed(0)
    bert = transformers.BertModel(CONFIG, add_pooling_layer=True)
    tensors = dict(bert.state_dict())
    worker = MatrixWorker()
    for name, module in bert.named_modules():
        if isinstance(module, torch.nn.Linear) and "pooler" not in name:
            tensors.update(worker.quantize(MatrixJob(name, QuantSpec("nf", 4, 32), 4, 1), module.weight).tensors)
            del tensors[name + ".weight"]
    return tensors


def make_engine(tensors, zero_stage: int, precision: str, seed: int):
    """A DeepSpeed engine over a freshly built quantized classifier (the head's init depends on `seed`)."""
    import deepspeed

    settings = TrainSettings(zero_stage=zero_stage, precision=precision, micro_batch_size=4, lr=1e-2)
    torch.manual_seed(seed)
    model = build_model(CONFIG.to_dict(), tensors, AdapterSettings(rank=4, alpha=8), "lora", num_labels=3)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(settings))
    return engine


def batch(i: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + i)
    return {"input_ids": torch.randint(1, 256, (4, 12), generator=gen),
            "labels": torch.randint(0, 3, (4,), generator=gen)}


def train(engine, steps: range) -> None:
    engine.train()
    for i in steps:
        engine.backward(engine(**batch(i)).loss)
        engine.step()


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def adam_state(engine) -> dict[str, torch.Tensor]:
    """The inner optimizer's state as DeepSpeed left it: each master parameter and its step and moments."""
    out = {}
    for i, (param, state) in enumerate(inner_optimizer(engine).state.items()):
        out[f"param.{i}"] = param.detach().float().clone()
        out.update({f"{i}.{key}": value.detach().float().clone() for key, value in state.items()})
    return out


@pytest.mark.parametrize("zero_stage,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"),
                                                  (0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16")])
def test_resumed_engine_continues_exactly(process_group, entry_tensors, tmp_path, zero_stage, precision):
    original = make_engine(entry_tensors, zero_stage, precision, seed=0)
    train(original, range(3))
    save_checkpoint(str(tmp_path), original, {"step": 3})
    assert os.path.exists(tmp_path / OPTIMIZER_FILE.format(rank=0))

    resumed = make_engine(entry_tensors, zero_stage, precision, seed=1)  # another head: the checkpoint must win
    state = load_checkpoint(str(tmp_path), resumed)
    assert state["step"] == 3 and state["optimizer_restored"] is True
    saved_adam, loaded_adam = adam_state(original), adam_state(resumed)
    assert any(k.endswith("exp_avg_sq") for k in saved_adam) and max_difference(saved_adam, loaded_adam) == 0

    os.remove(tmp_path / OPTIMIZER_FILE.format(rank=0))  # an old checkpoint: adapters only, no optimizer
    fresh = make_engine(entry_tensors, zero_stage, precision, seed=1)
    assert load_checkpoint(str(tmp_path), fresh)["optimizer_restored"] is False
    for engine in (original, resumed, fresh):
        train(engine, range(3, 5))
    want = trainable_state(original)
    assert max_difference(want, trainable_state(resumed)) <= 1e-6
    # fresh moments move every adapter by about lr per step (Adam's first steps are sign-like): far apart
    assert max_difference(want, trainable_state(fresh)) > 1e-3


def test_partition_of_another_world_size_is_skipped_with_a_warning(process_group, entry_tensors, tmp_path, caplog):
    original = make_engine(entry_tensors, 2, "fp32", seed=0)
    train(original, range(2))
    save_checkpoint(str(tmp_path), original, {"step": 2})
    path = str(tmp_path / OPTIMIZER_FILE.format(rank=0))
    with safe_open(path, "pt") as f:  # the same partition, labelled as saved by a two-worker run
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()["loftune"])
    save_file(tensors, path, metadata={"loftune": json.dumps({**header, "world_size": 2})})

    resumed = make_engine(entry_tensors, 2, "fp32", seed=1)
    with caplog.at_level(logging.WARNING, logger="workers.train_loop"):
        state = load_checkpoint(str(tmp_path), resumed)
    assert state["optimizer_restored"] is False
    assert "not restoring the optimizer state" in caplog.text and "'world_size': 2" in caplog.text
    assert not inner_optimizer(resumed).state  # fresh moments
    # the adapters were restored all the same, into ZeRO's fp32 master copy too: the next step starts from
    # them, and a first Adam step moves each value by about lr (1e-2); stale masters would undo the restore
    assert max_difference(trainable_state(original), trainable_state(resumed)) == 0
    train(resumed, range(2, 3))
    assert max_difference(trainable_state(original), trainable_state(resumed)) <= 1.5e-2
