"""`loftune export`: a trial's model (or a cache entry's LoftQ-initialized base) in a format other tools load.

    source:  a trial of a run directory (its checkpoint over its cache entry)  |  a cache entry alone (--base)
    format:  peft  DIR/base/ (dequantized base, bf16 Hugging Face directory) + DIR/adapter/ (PEFT)
             hf    DIR/ the merged model, bf16 Hugging Face directory
             gguf  DIR/model.gguf for llama.cpp / Ollama; a QA-LoRA INT4 g32 trial as Q4_1, bit for bit

Every export writes loftune.json (base key, trial, metric) beside it, and is written into a temporary folder
next to DIR and renamed into place, so DIR is either the previous export or the whole new one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file
from torch import nn

from orchestrator.cache import BaseCache
from orchestrator.entry import factor_ranks, read_model_inputs
from orchestrator.results import TrialRecord, best_records, read_trials
from orchestrator.spec import JobSpec, metric_for
from workers.checkpoint import STATE_FILE, TRAINABLE_FILE
from workers.entry_format import is_factor
from workers.export import PROVENANCE_FILE, export_peft_adapter, merged_fp_model, quant_layers, write_provenance
from workers.model_files import write_tokenizer_files
from workers.model_source import HEAD_NAMES
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings

FORMATS = ("peft", "hf", "gguf")
GGUF_TYPES = ("f16", "q8_0")
GGUF_FILE = "model.gguf"
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM",
                   "prompt_answer": "CAUSAL_LM"}


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the option or the trial."""


@dataclass
class ExportSource:
    """A model ready to export and what describes it."""

    model: nn.Module
    model_config: dict
    tokenizer_files: dict[str, bytes]  # the entry's tokenizer (JSON files), written beside every export
    task_type: str  # PEFT's: CAUSAL_LM or SEQ_CLS
    provenance: dict  # loftune.json
    heads: list[str] = field(default_factory=list)  # full-precision modules trained with the adapters

    @property
    def adapter_kind(self) -> str:
        kinds = {layer.adapter for layer in quant_layers(self.model).values()}
        return "qalora" if "qalora" in kinds else "lora"


def choose_trials(run_dir: str, spec: JobSpec, task: str | None = None,
                  trial_id: str | None = None) -> list[TrialRecord]:
    """The trials to export: `trial_id`, else the best finished trial of `task`, else the best of every task."""
    records = read_trials(run_dir, spec)
    if trial_id is not None:
        chosen = [r for r in records if r.trial.id == trial_id]
        if not chosen:
            raise ExportError(f"--trial: no trial {trial_id!r} in {run_dir}; its trials: "
                              f"{sorted(r.trial.id for r in records)[:20]}")
        if chosen[0].checkpoint is None:
            raise ExportError(f"--trial: trial {trial_id} has no checkpoint yet (status {chosen[0].status})")
        return chosen
    best = best_records(records, spec)
    if task is not None:
        if task not in {t.name for t in spec.tasks}:
            raise ExportError(f"--task: no task {task!r} in {run_dir}; its tasks: {[t.name for t in spec.tasks]}")
        if task not in best:
            raise ExportError(f"--task: task {task} has no finished trial with a checkpoint yet")
        return [best[task]]
    if not best:
        raise ExportError(f"{run_dir}: no finished trial with a checkpoint yet")
    return list(best.values())


def trial_source(spec: JobSpec, record: TrialRecord, cache: BaseCache) -> ExportSource:
    """The trial's model: its cache entry, with the adapters and head of its checkpoint loaded."""
    trial = record.trial
    task = next(t for t in spec.tasks if t.name == trial.task)
    adapter = trial.adapter_settings(spec.adapter)
    inputs = read_model_inputs(cache, trial.base, rank=trial.rank, init=adapter.init)
    saved = load_file(os.path.join(record.checkpoint, TRAINABLE_FILE))
    model = build_model(inputs.model_config, inputs.tensors, adapter, inputs.adapter_kind,
                        _num_labels(record.checkpoint, saved, task.type))
    missing = set(saved) - set(model.state_dict())
    if missing:
        raise ExportError(f"checkpoint {record.checkpoint} holds tensors the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(saved, strict=False)
    metric, _ = metric_for(spec.sweep, task.type)
    provenance = {"base": trial.base, "run": spec.name, "task": task.name, "trial": trial.to_dict(),
                  "metric": metric, "value": record.final.get(metric), "step": record.step,
                  "checkpoint": record.checkpoint}
    heads = sorted({name.rsplit(".", 1)[0] for name in saved if not is_factor(name)})
    return ExportSource(model.eval(), inputs.model_config, inputs.tokenizer_files, PEFT_TASK_TYPES[task.type],
                        provenance, heads)


def base_source(cache: BaseCache, key: str, rank: int | None = None) -> ExportSource:
    """A cache entry's causal LM as built, with its LoftQ factors for `rank` (the entry's only rank by default)
    as the adapter: what a trial starts from."""
    manifest = cache.show(key)
    config = manifest["model"]["config"]
    if not any(a.endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise ExportError(f"--base {key}: exporting a base needs a causal LM; this entry's model is "
                          f"{config.get('architectures')} (export a trial of a run instead)")
    ranks = factor_ranks(manifest)
    if rank is None and len(ranks) > 1:
        raise ExportError(f"--rank: entry {key} holds LoftQ factors for ranks {ranks}; pick one")
    rank = rank if rank is not None else (ranks[0] if ranks else 0)
    if rank and rank not in ranks:
        raise ExportError(f"--rank: entry {key} has no factors for rank {rank} (it has {ranks or 'none'})")
    init = "loftq" if rank else "qlora"
    inputs = read_model_inputs(cache, key, rank=rank, init=init)
    adapter = AdapterSettings(rank=rank, alpha=2 * rank if rank else 16, init=init)
    model = build_model(config, inputs.tensors, adapter, inputs.adapter_kind, None)
    provenance = {"base": key, "rank": rank, "init": init}
    return ExportSource(model.eval(), config, inputs.tokenizer_files, "CAUSAL_LM", provenance)


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
        raise ExportError(f"checkpoint {checkpoint}: cannot tell the task head's size (no num_labels in {STATE_FILE})")
    return int(heads[-1].shape[0])


# ---------------------------------------------------------------------------------------------- writing


def write_export(source: ExportSource, out_dir: str, fmt: str, *, gguf_type: str | None = None) -> str:
    """Write `source` as `fmt` into `out_dir` (through a temporary folder beside it); returns out_dir."""
    if fmt not in FORMATS:
        raise ExportError(f"--format: expected one of {list(FORMATS)}, got {fmt!r}")
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        write_format(source, tmp, fmt, gguf_type=gguf_type)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # a previous export (checked above): replaced whole
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_format(source: ExportSource, folder: str, fmt: str, *, gguf_type: str | None = None) -> None:
    """Write `source` as `fmt` into the (empty) `folder`, with loftune.json."""
    {"peft": _write_peft, "hf": _write_hf, "gguf": _write_gguf}[fmt](source, folder, gguf_type)
    write_provenance(folder, {**source.provenance, "format": fmt, **({"gguf_type": gguf_type} if gguf_type else {})})


def _check_out_dir(out_dir: str) -> None:
    """--out is new, empty, or an earlier loftune export (it holds loftune.json): nothing else is replaced."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out: {out_dir} is a file; expected a new or empty directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, PROVENANCE_FILE)):
        raise ExportError(f"--out: {out_dir} is not empty and is not a loftune export (no {PROVENANCE_FILE})")


def _write_peft(source: ExportSource, folder: str, gguf_type: str | None) -> None:
    if source.adapter_kind == "qalora":
        raise ExportError("--format peft: QA-LoRA adapters pool their input, which PEFT cannot express; they merge "
                          "exactly into the quantized base: use --format hf or --format gguf")
    base = merged_fp_model(source.model, with_adapter=False)
    _save_hf(base, os.path.join(folder, "base"), source)
    export_peft_adapter(source.model, os.path.join(folder, "adapter"), task_type=source.task_type,
                        provenance=source.provenance, trainable_modules=source.heads)


def _write_hf(source: ExportSource, folder: str, gguf_type: str | None) -> None:
    _save_hf(merged_fp_model(source.model, with_adapter=True), folder, source)


def _save_hf(model: nn.Module, folder: str, source: ExportSource) -> None:
    """A bf16 Hugging Face directory with the entry's config and tokenizer."""
    model = model.to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_files(source.tokenizer_files, folder)


def _write_gguf(source: ExportSource, folder: str, gguf_type: str | None) -> None:
    """Causal LMs only. A QA-LoRA trial is written from its merged codes (Q4_1 at INT4 g32, exactly) unless a
    --gguf-type is asked for, which writes the merged full-precision weights at that type instead."""
    from workers.gguf_export import write_gguf

    if source.task_type != "CAUSAL_LM":
        raise ExportError("--format gguf: llama.cpp runs causal LMs; this trial trains a classification head "
                          "(use --format peft or hf)")
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise ExportError(f"--gguf-type: expected one of {list(GGUF_TYPES)}, got {gguf_type!r}")
    quantized = {}
    if source.adapter_kind == "qalora" and gguf_type is None:
        for name, layer in quant_layers(source.model).items():
            layer.merge()  # the adapter folds into the zero points: still INT, same codes and scales
            quantized[name] = layer.quantized
    written_quantized = {f"{name}.weight" for name in quantized}
    tensors = {k: v for k, v in merged_fp_model(source.model, with_adapter=True).state_dict().items()
               if k not in written_quantized}
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer_files(source.tokenizer_files, tokenizer_dir)
        write_gguf(os.path.join(folder, GGUF_FILE), config=source.model_config, tensors=tensors,
                   tokenizer_dir=tokenizer_dir, quantized=quantized or None, gguf_type=gguf_type or "f16",
                   metadata={"general.name": str(source.provenance.get("task") or source.provenance["base"])})
