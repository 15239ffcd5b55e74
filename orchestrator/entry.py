"""A cache entry as loftune reads it: its files, its tensors, which factors it has, its adapter kind, its errors.

    <build_id>/base-00000.safetensors ...     the target matrices (quantized, or the bf16 control's), sharded
    <build_id>/rest.safetensors               every other tensor of the model
    <build_id>/lora-r<rank>.safetensors       LoftQ factors for one rank (one file per rank in `factor_ranks`)
    <build_id>/config.json, tokenizer/*.json  the model's config and tokenizer: the entry is self-contained

The tensor names inside those files are workers/entry_format.py's. orchestrator/build.py writes entries; this
module only reads them and imports neither Ray nor tqdm, so training, export and the benchmarks read an entry
without starting a cluster. `read_model_inputs` is the one way from an entry to what a model is built from.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass

import torch

from orchestrator.cache import BaseCache, CacheCorruptError
from workers.entry_format import adapter_for

REST_FILE = "rest.safetensors"
CONFIG_FILE = "config.json"  # the model's config, in the build folder
TOKENIZER_DIR = "tokenizer"  # the model's tokenizer as JSON files: <build_id>/tokenizer/*.json
BASE_SHARD_PREFIX = "base-"
FACTOR_FILE_PREFIX = "lora-r"


def base_shard_file(index: int) -> str:
    """The file of the `index`-th shard of target matrices."""
    return f"{BASE_SHARD_PREFIX}{index:05d}.safetensors"


def factor_file(rank: int) -> str:
    """The file of the LoftQ factors for `rank`."""
    return f"{FACTOR_FILE_PREFIX}{rank}.safetensors"


def factor_ranks(manifest: dict) -> list[int]:
    """The ranks the entry holds LoftQ factors for ([] for QLoRA and the full-precision control)."""
    return list(manifest.get("factor_ranks") or [])


def adapter_kind(manifest: dict) -> str:
    """The adapter a model over this entry trains: 'qalora' for a QA-LoRA base, else 'lora'."""
    return adapter_for(manifest.get("method"))


def entry_tokenizer_files(cache: BaseCache, name: str) -> dict[str, bytes]:
    """The tokenizer an entry carries, file name -> bytes (e.g. 'tokenizer.json'): written into one directory, they
    load with transformers.AutoTokenizer.from_pretrained. Each is checked against the manifest (size, sha256;
    CacheCorruptError if it differs). {} for an entry without one (a model with no tokenizer, an older entry)."""
    manifest = cache.show(name)
    prefix = f"{manifest['build_id']}/{TOKENIZER_DIR}/"
    return {rel[len(prefix):]: cache.read_bytes(name, rel) for rel in sorted(manifest["files"])
            if rel.startswith(prefix)}


def load_entry_tensors(cache: BaseCache, name: str, rank: int | None = None,
                       verify: bool = True) -> dict[str, torch.Tensor]:
    """Every tensor of an entry a model needs: base shards, the rest, and the factors for `rank` if any.

    With `verify` each file's sha256 is checked; without it only sizes are (trials read an entry many times,
    and the driver checked the hashes once, through ensure_base(verify_hashes=True)). CacheCorruptError if a
    file does not match its manifest."""
    manifest = cache.show(name)
    if not verify:
        problems = cache.problems(name, hashes=False)
        if problems:
            raise CacheCorruptError(f"entry {name} is broken: {problems[0]}")
    tensors: dict[str, torch.Tensor] = {}
    wanted_factor = factor_file(rank) if rank else None
    for file in manifest["files"]:
        base = file.rsplit("/", 1)[-1]
        if not base.endswith(".safetensors") or (base.startswith(FACTOR_FILE_PREFIX) and base != wanted_factor):
            continue
        tensors.update(cache.read_file(name, file, verify=verify))
    return tensors


@dataclass
class ModelInputs:
    """What a model over one cache entry is built from: workers.train_loop.build_model takes its model_config,
    tensors and adapter_kind (with the adapter settings and the task head's size)."""

    model_config: dict  # the model's config.json, as the entry recorded it
    tensors: dict[str, torch.Tensor]  # the entry's tensors, with the LoftQ factors the adapter starts from
    adapter_kind: str  # 'lora' | 'qalora'
    tokenizer_files: dict[str, bytes]  # the entry's tokenizer; {} for an entry that carries none
    model_path: str  # the directory the base was built from: where an older entry's tokenizer is


def read_model_inputs(cache: BaseCache, name: str, *, rank: int = 0, init: str = "loftq",
                      verify: bool = True) -> ModelInputs:
    """Read entry `name` for an adapter of `rank` starting from `init`: the entry's factors for that rank are read
    only for init 'loftq' (a QLoRA-style start has random A and B = 0). `verify` as in `load_entry_tensors`."""
    manifest = cache.show(name)
    factors = rank if init == "loftq" and rank else None
    return ModelInputs(model_config=manifest["model"]["config"],
                       tensors=load_entry_tensors(cache, name, rank=factors, verify=verify),
                       adapter_kind=adapter_kind(manifest), tokenizer_files=entry_tokenizer_files(cache, name),
                       model_path=manifest["model"]["path"])


def error_table(manifest: dict) -> str:
    """Per layer type (layer index folded to '*'): matrices, mean plain-quantization and final error (a
    calibrated entry's are output errors, on its calibration inputs), and where calibration data was there, the
    final error in both norms: weight ||W - Q - BA|| / ||W|| and output ||(W - Q - BA) R^T|| / ||W R^T||."""
    groups: dict[str, list[dict]] = {}
    for module, rec in manifest.get("matrices", {}).items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(rec)
    width = max((len(k) for k in groups), default=10)
    scored = all("output_error" in r for recs in groups.values() for r in recs) and bool(groups)
    lines = [f"{'layer':<{width}} {'n':>3} {'quant':>9} {'qlora_err':>9} {'final_err':>9} {'ratio':>6}"
             + (f" {'weight_err':>10} {'output_err':>10}   (output: on the calibration inputs)" if scored else "")]
    for layer, recs in sorted(groups.items()):
        q = statistics.fmean(r["quant_error"] for r in recs)
        f = statistics.fmean(min(r["errors"]) if r["errors"] else r["quant_error"] for r in recs)
        ratio = f"{f / q:6.3f}" if q else f"{'-':>6}"  # the bf16 control has no error to reduce
        both = (f" {statistics.fmean(r['weight_error'] for r in recs):10.5f}"
                f" {statistics.fmean(r['output_error'] for r in recs):10.5f}") if scored else ""
        lines.append(f"{layer:<{width}} {len(recs):>3} {recs[0]['quant']:>9} {q:9.5f} {f:9.5f} {ratio}{both}")
    return "\n".join(lines)
