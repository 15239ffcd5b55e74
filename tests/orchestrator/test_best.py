"""The best trial's export from its checkpoint: QA-LoRA folds into a merged quantized model that reproduces the
trained model's outputs (the LoRA / PEFT route is covered end to end in tests/orchestrator/test_sweep.py)."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from conftest import fake_trained_checkpoint, planned_with_bases
from safetensors.torch import load_file

from orchestrator.best import export_best
from orchestrator.entry import load_entry_tensors, read_model_inputs
from orchestrator.results import TrialRecord
from workers.surgery import apply_quantized_base
from workers.train_loop import build_model

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture
def qalora_run(tmp_path):
    """A planned QA-LoRA trial on the built-in tiny BERT, its base built, and a 'trained' checkpoint of it."""
    data = tmp_path / "data.csv"
    data.write_text("text,label\n" + "".join(f"w{i} x{i % 3},{'ab'[i % 2]}\n" for i in range(40)))
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "qa", "model": "tiny-bert", "cache": {"uri": str(tmp_path / "cache")},
        "quantization": {"kind": "int", "bits": 4, "group_size": 32, "method": "qalora", "rank": 4, "iters": 1,
                         "scale_dtype": "float32"},
        "tasks": [{"name": "t", "type": "classification", "train_file": str(data)}],
        "training": {"max_steps": 5}}))
    spec, cache, plan = planned_with_bases(spec_path)
    trial = plan.trials[0]
    adapter = trial.adapter_settings(spec.adapter)
    inputs = read_model_inputs(cache, trial.base, rank=adapter.rank, init=adapter.init)
    assert inputs.adapter_kind == "qalora"
    model = build_model(inputs.model_config, inputs.tensors, adapter, inputs.adapter_kind, num_labels=2).eval()
    checkpoint = fake_trained_checkpoint(model, tmp_path / "checkpoint", {"step": 5, "num_labels": 2})
    record = TrialRecord(trial, "done", 5, [{"step": 5, "eval_accuracy": 0.75, "checkpoint_path": str(checkpoint)}])
    return spec, cache, record, model


def test_qalora_best_trial_exports_a_merged_quantized_model(tmp_path, qalora_run):
    spec, cache, record, trained_model = qalora_run
    out = export_best(str(tmp_path / "run"), spec, record, cache)
    merged_dir = os.path.join(out, "merged-quantized")
    with open(os.path.join(merged_dir, "loftune.json")) as f:
        provenance = json.load(f)
    assert provenance["base"] == record.trial.base and provenance["merged"] == "qalora"
    assert provenance["value"] == 0.75 and provenance["trial"]["id"] == record.trial.id
    tensors = load_file(os.path.join(merged_dir, "model.safetensors"))
    entry = load_entry_tensors(cache, record.trial.base)
    codes = [k for k in entry if k.endswith(".qweight.codes")]
    assert codes and all(torch.equal(tensors["bert." + k], entry[k]) for k in codes)  # same codes: still INT4
    # a fresh model holding only the merged quantized weights (no adapters) gives the trained model's outputs
    fresh = build_model(cache.show(record.trial.base)["model"]["config"],
                        {k: v for k, v in entry.items() if ".qweight." not in k},
                        record.trial.adapter_settings(spec.adapter), "qalora", num_labels=2)
    apply_quantized_base(fresh, tensors, rank=0)
    fresh.eval()
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, trained_model(ids).logits, atol=1e-4)
    assert not os.path.exists(out + ".tmp")
