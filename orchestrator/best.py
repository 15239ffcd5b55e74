"""Export the best trial of each task from its last checkpoint.

    checkpoint (trainable.safetensors + state.json) + the cache entry it trained on -> the task model
        -> LoRA: the adapter (and task head) in PEFT's format; QA-LoRA: the merged, still-quantized model

Written to `<run_dir>/best/<task>/` with `loftune.json` beside it naming the base's cache key, the trial and
its metrics. The export goes to a temporary folder first and is renamed into place; what it replaces is
deleted only inside the run directory (a link planted at `best/<task>` is removed as a link, never followed).
"""

from __future__ import annotations

import json
import os

from safetensors.torch import load_file

from orchestrator.build import load_entry_tensors
from orchestrator.cache import BaseCache
from orchestrator.results import TrialRecord
from orchestrator.safe_paths import check_component, remove_tree
from orchestrator.spec import JobSpec, metric_for
from workers.checkpoint import STATE_FILE, TRAINABLE_FILE
from workers.export import export_peft_adapter, export_qalora_merged
from workers.model_source import HEAD_NAMES
from workers.train_loop import build_model

BEST_DIR = "best"
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM",
                   "prompt_answer": "CAUSAL_LM"}


def export_best(run_dir: str, spec: JobSpec, record: TrialRecord, cache: BaseCache) -> str:
    """Rebuild the best trial's model from its checkpoint and export it; returns the export folder."""
    trial = record.trial
    task = next(t for t in spec.tasks if t.name == trial.task)
    manifest = cache.show(trial.base)
    adapter = trial.adapter_settings(spec.adapter)
    tensors = load_entry_tensors(cache, trial.base, rank=trial.rank if adapter.init == "loftq" else None)
    model_config = manifest["model"]["config"]
    adapter_kind = "qalora" if manifest.get("method") == "qalora" else "lora"
    saved = load_file(os.path.join(record.checkpoint, TRAINABLE_FILE))
    model = build_model(model_config, tensors, adapter, adapter_kind,
                        _num_labels(record.checkpoint, saved, task.type))
    missing = set(saved) - set(model.state_dict())
    if missing:
        raise ValueError(f"checkpoint {record.checkpoint} holds tensors the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(saved, strict=False)
    metric, _ = metric_for(spec.sweep, task.type)
    provenance = {"base": trial.base, "run": spec.name, "task": task.name, "trial": trial.to_dict(),
                  "metric": metric, "value": record.final.get(metric), "step": record.step,
                  "checkpoint": record.checkpoint}
    final = os.path.join(run_dir, BEST_DIR, check_component(task.name, "tasks[].name"))
    tmp = final + ".tmp"
    remove_tree(tmp, run_dir)
    if adapter_kind == "qalora":
        export_qalora_merged(model, os.path.join(tmp, "merged-quantized"), model_config=model_config,
                             provenance=provenance)
    else:
        heads = sorted({name.rsplit(".", 1)[0] for name in saved if not name.endswith(("lora_A", "lora_B"))})
        export_peft_adapter(model, os.path.join(tmp, "adapter"), task_type=PEFT_TASK_TYPES[task.type],
                            provenance=provenance, trainable_modules=heads)
    remove_tree(final, run_dir)
    os.replace(tmp, final)
    return final


def _num_labels(checkpoint: str, saved: dict, task_type: str) -> int | None:
    """Outputs of the task head: from the checkpoint's state, else the saved head's rows (None: a causal LM)."""
    if task_type not in ("classification", "regression"):
        return None
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        state = json.load(f)
    if "num_labels" in state:
        return int(state["num_labels"])
    heads = [t for name, t in saved.items() if name.split(".")[0] in HEAD_NAMES and name.endswith("weight")
             and t.ndim == 2]
    if not heads:
        raise ValueError(f"checkpoint {checkpoint}: cannot tell the task head's size (no num_labels in {STATE_FILE})")
    return int(heads[-1].shape[0])
