"""Export the best trial of each task from its last checkpoint, as `loftune run` finishes.

    checkpoint (trainable.safetensors + state.json) + the cache entry it trained on -> the task model
        -> LoRA: base/ (the dequantized base, bf16 Hugging Face directory) + adapter/ (PEFT), as `loftune export
           --format peft` writes them; QA-LoRA: merged-quantized/, the merged, still-quantized model

Written to `<run_dir>/best/<task>/` with `loftune.json` beside it naming the base's cache key, the trial and
its metrics. The export goes to a temporary folder first and is renamed into place; what it replaces is
deleted only inside the run directory (a link planted at `best/<task>` is removed as a link, never followed).
"""

from __future__ import annotations

import os

from orchestrator.cache import BaseCache
from orchestrator.export_model import trial_source, write_format
from orchestrator.results import TrialRecord
from orchestrator.run_dir import BEST_DIR
from orchestrator.safe_paths import check_component, remove_tree
from orchestrator.spec import JobSpec
from workers.export import export_qalora_merged


def export_best(run_dir: str, spec: JobSpec, record: TrialRecord, cache: BaseCache) -> str:
    """Rebuild the best trial's model from its checkpoint and export it; returns the export folder."""
    source = trial_source(spec, record, cache)
    final = os.path.join(run_dir, BEST_DIR, check_component(record.trial.task, "tasks[].name"))
    tmp = final + ".tmp"
    remove_tree(tmp, run_dir)
    os.makedirs(tmp)
    if source.adapter_kind == "qalora":
        export_qalora_merged(source.model, os.path.join(tmp, "merged-quantized"), model_config=source.model_config,
                             provenance=source.provenance)
    else:
        write_format(source, tmp, "peft")
    remove_tree(final, run_dir)
    os.replace(tmp, final)
    return final
