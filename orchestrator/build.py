"""Build a model's quantized base once, spreading per-matrix LoftQ over Ray actors, into the shared cache.

    request -> key -> intact cache hit? done : lock -> plan the matrices -> actors (largest first) -> shards -> manifest

A hit is checked before it is trusted: every file's size (and its sha256 with `verify_hashes`, which the driver of
a run asks for once per entry). A broken entry is rebuilt under its lock: it is content-addressed, so the rebuild
is identical. An entry is self-contained: it carries the model's config and tokenizer as JSON files
(`entry_tokenizer_files`), so a cache that was copied or mounted elsewhere still trains.

The driver streams one full-precision matrix at a time from the model files into the object store, at
most two per actor in flight, and writes each shard of results as soon as all its matrices are back, so
memory stays near the quantized model plus a few matrices. Shard membership follows the (deterministic)
schedule, and every matrix has its own seed, so an entry is byte-identical however the work was spread or
retried. Actors that die are restarted by Ray and their matrix is redone (max_restarts / max_task_retries).
The full-precision control (bits 16, `BuildRequest.full_precision`) is built the same way, into an entry like the
others: its actors keep each target weight in bf16 (`<module>.fpweight`, error 0) instead of quantizing it.
"""

from __future__ import annotations

import logging
import os
import re
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray
import torch
from tqdm import tqdm

from orchestrator.cache import BaseCache, BaseCacheKey, CacheCorruptError, CacheError, CacheForeignError
from workers.matrix_worker import (
    FULL_PRECISION_BITS,
    FULL_PRECISION_DTYPE,
    FULL_PRECISION_METHOD,
    METHODS,
    MatrixJob,
    MatrixResult,
    MatrixWorker,
    is_factor,
)
from workers.model_source import ModelSource
from workers.quant import packed_nbytes
from workers.quant_plan import QuantPlan

SHARD_BYTES = 1 << 30
REST_FILE = "rest.safetensors"
CONFIG_FILE = "config.json"  # the model's config, in the build folder
TOKENIZER_DIR = "tokenizer"  # the model's tokenizer as JSON files: <build_id>/tokenizer/*.json


# The key's quantization of the full-precision control: no quantizer kind, group size or scale dtype apply to it.
FULL_PRECISION_QUANT = {"bits": FULL_PRECISION_BITS, "dtype": str(FULL_PRECISION_DTYPE).removeprefix("torch.")}


class BuildInputError(ValueError):
    """The request cannot be built as asked (raised before any work starts)."""


@dataclass(frozen=True)
class BuildRequest:
    """One quantized base: a model, a quantization plan, the method, and the LoftQ rank and iterations.

    `plan` None with method 'lora' is the full-precision control (bits 16): its entry holds the target weights in
    bf16 (no codes, no factors, error 0), built through the same actors. `full_precision` makes one.
    """

    source: ModelSource
    plan: QuantPlan | None
    method: str = "loftq"
    rank: int = 16
    iters: int = 1
    targets: tuple[str, ...] = ("all-linear",)
    seed: int = 0

    @classmethod
    def full_precision(cls, source: ModelSource, *, rank: int = 16, targets: tuple[str, ...] = ("all-linear",),
                       seed: int = 0) -> BuildRequest:
        """The bf16 base of the full-precision control: plain LoRA trains over it."""
        return cls(source, None, method=FULL_PRECISION_METHOD, rank=rank, iters=0, targets=targets, seed=seed)

    @property
    def is_full_precision(self) -> bool:
        return self.plan is None

    @property
    def label(self) -> str:
        """Readable quantization: 'nf2-g64' (QuantPlan.label), or 'bf16' for the full-precision control."""
        return "bf16" if self.plan is None else self.plan.label

    @property
    def effective_iters(self) -> int:
        """QLoRA is LoftQ with no alternation: its base is plain quantization whatever `iters` says (and the
        full-precision control has no quantization to alternate with)."""
        return 0 if self.method in ("qlora", FULL_PRECISION_METHOD) else self.iters

    def key(self) -> BaseCacheKey:
        quant = FULL_PRECISION_QUANT if self.plan is None else self.plan.to_dict()
        return BaseCacheKey(model=self.source.name, fingerprint=self.source.fingerprint, quant=quant,
                            quant_label=self.label, method=self.method, iters=self.effective_iters,
                            rank=self.rank, targets=tuple(sorted(self.targets)))

    @property
    def stores_factors(self) -> bool:
        return self.effective_iters > 0 and self.rank > 0


@dataclass
class BuildResult:
    name: str
    uri: str
    built: bool  # False on a cache hit
    seconds: float
    manifest: dict = field(repr=False, default_factory=dict)
    repaired: list[str] = field(default_factory=list)  # the problems that made the entry be rebuilt; [] otherwise


def factor_file(rank: int) -> str:
    return f"lora-r{rank}.safetensors"


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster at `address`, or start the embedded local one; a no-op when already connected."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)


def plan_jobs(request: BuildRequest) -> tuple[list[MatrixJob], dict[str, tuple]]:
    """The per-matrix jobs, largest first; every problem with the request raised at once, before any work."""
    if request.method not in (*METHODS, FULL_PRECISION_METHOD):
        raise BuildInputError(f"method: expected one of {list(METHODS)}, got {request.method!r}")
    if request.is_full_precision != (request.method == FULL_PRECISION_METHOD):
        raise BuildInputError(f"method: {FULL_PRECISION_METHOD!r} (the full-precision control) goes with no "
                              f"quantization plan and every other method with one; got {request.method!r} "
                              f"{'without' if request.is_full_precision else 'with'} a plan")
    modules = request.source.select_targets(request.targets)
    if not modules:
        raise BuildInputError(f"targets: {list(request.targets)} match no linear layer of {request.source.name}")
    shapes = {m: request.source.tensors[m + ".weight"].shape for m in modules}
    problems = [] if request.plan is None else request.plan.problems(shapes)
    if request.method == "qalora" and request.plan.base.kind != "int":
        problems.append(f"quantization.kind: method 'qalora' needs kind 'int', got {request.plan.base.kind!r}")
    if problems:
        raise BuildInputError("cannot build this base:\n  " + "\n  ".join(problems))
    jobs = [MatrixJob(m, None if request.plan is None else request.plan.spec_for(m), request.rank,
                      request.effective_iters, request.method, request.seed) for m in modules]
    jobs.sort(key=lambda j: (-shapes[j.module][0] * shapes[j.module][1], j.module))
    return jobs, shapes


def ensure_base(
    request: BuildRequest,
    cache: BaseCache,
    *,
    actors: int | None = None,
    threads_per_actor: int = 1,
    address: str | None = None,
    progress: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
    shard_bytes: int = SHARD_BYTES,
    verify_hashes: bool = False,
) -> BuildResult:
    """Return the cached base for `request`, building it (or its LoRA factors for a new rank) if missing.

    A hit is checked first: file sizes, and sha256 too with `verify_hashes`. A broken entry (unreadable manifest,
    missing, truncated or wrong-hash file) is rebuilt under its lock and its problems are returned in
    `BuildResult.repaired`. A CacheError in one line names the entry, its first problem and the repair command
    when the rebuild is impossible (a read-only cache), and a foreign entry is never written through.
    Ray is only joined (at `address`, else the embedded local Ray) when something has to be built.
    """
    start = time.perf_counter()
    key = request.key()
    manifest, problems = _entry_state(cache, key, verify_hashes)
    if manifest is not None and not problems and _has_factors(manifest, request):
        return BuildResult(key.name, cache.uri, False, time.perf_counter() - start, manifest)
    jobs, shapes = plan_jobs(request)
    try:
        with cache.lock(key):
            # another builder may have finished (or repaired the entry) while we waited
            manifest, problems = _entry_state(cache, key, verify_hashes)
            if manifest is not None and not problems and _has_factors(manifest, request):
                return BuildResult(key.name, cache.uri, False, time.perf_counter() - start, manifest)
            if problems:
                cache.unpublish(key.name)  # else commit would keep the broken manifest as a lost race's winner
                manifest = None
            manifest = _build_locked(request, key, cache, manifest, jobs, shapes, actors, threads_per_actor,
                                     address, progress, on_progress, shard_bytes)
    except CacheError as exc:
        if not problems or isinstance(exc, CacheForeignError):
            raise
        raise CacheError(f"entry {key.name} is broken ({problems[0]}) and cannot be rebuilt here ({exc}); repair "
                         f"it with: loftune cache rm {key.name} --cache {cache.uri}, then run again") from None
    return BuildResult(key.name, cache.uri, True, time.perf_counter() - start, manifest, repaired=problems)


def _entry_state(cache: BaseCache, key: BaseCacheKey, hashes: bool) -> tuple[dict | None, list[str]]:
    """(manifest or None, problems) of `key`'s entry. A foreign entry is a CacheForeignError naming the fix."""
    try:
        manifest = cache.lookup(key)
    except CacheForeignError as exc:  # never rebuilt through a link: the link itself must go
        raise CacheForeignError(f"{exc}; remove the link with: loftune cache rm {key.name} --cache {cache.uri}"
                                ) from None
    except CacheCorruptError as exc:  # unreadable or rejected manifest: broken, rebuilt
        return None, [str(exc)]
    if manifest is None:
        return None, []
    return manifest, cache.problems(key.name, hashes=hashes)


def _build_locked(request, key, cache, manifest, jobs, shapes, actors, threads_per_actor, address, progress,
                  on_progress, shard_bytes) -> dict:
    """Build the entry (manifest None) or only this rank's factors, holding the entry's lock."""
    if manifest is not None:  # a rank-independent base exists: only the factors for this rank are missing
        jobs = [replace(j, want_base=False) for j in jobs]
        model_files = {}
    else:
        model_files = model_json_files(request.source)  # before Ray starts: a bad tokenizer fails fast
    connect(address)
    pool = _start_actors(actors, threads_per_actor, len(jobs))
    bar = tqdm(total=len(jobs), desc=f"quantize {key.name}", unit="matrix", disable=not progress, file=sys.stderr)
    try:
        if manifest is None:
            return _build_entry(request, key, cache, jobs, shapes, pool, bar, on_progress, shard_bytes, model_files)
        return _build_factors(request, manifest, cache, jobs, pool, bar, on_progress)
    finally:
        bar.close()
        for actor in pool:
            ray.kill(actor)


def describe_entry(request: BuildRequest, cache: BaseCache) -> str:
    """What ensure_base would do with `request`'s entry, for a dry run (sizes are checked, not hashes): 'cached',
    'to build', 'factors for rank R to add', 'broken (<first problem>): will be rebuilt', or
    'foreign (<reason>)' for an entry behind a link, which is never rebuilt."""
    try:
        manifest, problems = _entry_state(cache, request.key(), hashes=False)
    except CacheForeignError as exc:
        return f"foreign ({exc})"
    if problems:
        return f"broken ({problems[0]}): will be rebuilt"
    if manifest is None:
        return "to build"
    if not _has_factors(manifest, request):
        return f"factors for rank {request.rank} to add"
    return "cached"


def _has_factors(manifest: dict, request: BuildRequest) -> bool:
    return not request.stores_factors or request.rank in manifest.get("factor_ranks", [])


def _start_actors(actors: int | None, threads: int, n_jobs: int) -> list:
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if actors is None:
        actors = gpus or max(1, int(resources.get("CPU", 1)) // threads)
    actors = max(1, min(actors, n_jobs))
    # SPREAD: one actor per node before two on any node, so a build uses every node's CPUs (or GPUs) and a
    # lost node takes only its share of the actors (Ray restarts them elsewhere, their matrices are redone)
    options = dict(num_cpus=threads, num_gpus=1 if gpus else 0, max_restarts=3, max_task_retries=3,
                   scheduling_strategy="SPREAD")
    worker = ray.remote(MatrixWorker)
    return [worker.options(**options).remote(threads) for _ in range(actors)]


def _run_jobs(source: ModelSource, jobs: list[MatrixJob], pool: list, bar, on_progress):
    """Yield results as they come back, keeping at most two matrices in flight per actor."""
    queue = list(reversed(jobs))
    in_flight: dict[ray.ObjectRef, int] = {}

    def submit(actor_index: int) -> None:
        job = queue.pop()
        weight = ray.put(source.read(job.module + ".weight"))
        in_flight[pool[actor_index].quantize.remote(job, weight)] = actor_index

    for i in range(min(len(jobs), 2 * len(pool))):
        submit(i % len(pool))
    done = 0
    while in_flight:
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        actor_index = in_flight.pop(ready[0])
        result: MatrixResult = ray.get(ready[0])
        if queue:
            submit(actor_index)
        done += 1
        bar.update(1)
        if on_progress:
            on_progress(done, len(jobs))
        yield result


def _shard_plan(jobs: list[MatrixJob], shapes: dict, shard_bytes: int) -> dict[str, int]:
    """Shard index of each module's quantized weight, fixed by the schedule order (not by completion order)."""
    shard, size, out = 0, 0, {}
    for job in jobs:
        numel = shapes[job.module][0] * shapes[job.module][1]
        nbytes = numel * FULL_PRECISION_DTYPE.itemsize if job.spec is None else packed_nbytes(numel, job.spec.bits)
        if size and size + nbytes > shard_bytes:
            shard, size = shard + 1, 0
        out[job.module] = shard
        size += nbytes
    return out


def _build_entry(request, key, cache, jobs, shapes, pool, bar, on_progress, shard_bytes, model_files) -> dict:
    build_start = time.perf_counter()
    shard_of = _shard_plan(jobs, shapes, shard_bytes)
    remaining = Counter(shard_of.values())
    buffers: dict[int, dict[str, torch.Tensor]] = {s: {} for s in remaining}
    factors: dict[str, torch.Tensor] = {}
    matrices: dict[str, dict] = {}
    with cache.writer(key) as writer:
        for file, data in model_files.items():
            writer.add_json(file, data)
        for result in _run_jobs(request.source, jobs, pool, bar, on_progress):
            shard = shard_of[result.module]
            for name, tensor in result.tensors.items():
                (factors if is_factor(name) else buffers[shard])[name] = tensor
            matrices[result.module] = _matrix_record(result, shapes, request)
            remaining[shard] -= 1
            if remaining[shard] == 0:
                writer.add_file(f"base-{shard:05d}.safetensors", buffers.pop(shard))
        quantized = {m + ".weight" for m in shard_of}
        rest = {name: request.source.read(name) for name in request.source.tensors if name not in quantized}
        writer.add_file(REST_FILE, rest)
        if factors:
            writer.add_file(factor_file(request.rank), factors)
        return writer.commit(_manifest_extra(request, matrices, time.perf_counter() - build_start, bool(factors)))


def _build_factors(request, manifest, cache, jobs, pool, bar, on_progress) -> dict:
    """Add LoftQ factors for another rank to a rank-independent (iters <= 1) base (we hold its lock)."""
    factors: dict[str, torch.Tensor] = {}
    for result in _run_jobs(request.source, jobs, pool, bar, on_progress):
        factors.update({k: v for k, v in result.tensors.items() if is_factor(k)})
    update = {"factor_ranks": sorted({*manifest.get("factor_ranks", []), request.rank})}
    return cache.add_files(manifest["name"], {factor_file(request.rank): factors}, update)


def _matrix_record(result: MatrixResult, shapes: dict, request: BuildRequest) -> dict:
    quant = request.label if request.plan is None else request.plan.spec_for(result.module).name
    return {"shape": list(shapes[result.module]), "quant": quant, "quant_error": result.quant_error,
            "errors": result.errors, "seconds": round(result.seconds, 4), "device": result.device,
            "node": result.node}


def _manifest_extra(request: BuildRequest, matrices: dict, seconds: float, has_factors: bool) -> dict:
    import safetensors
    import transformers

    import workers

    return {
        "model": {"name": request.source.name, "path": request.source.path, "config": request.source.config},
        "method": request.method, "rank": request.rank, "iters": request.iters, "seed": request.seed,
        "factor_ranks": [request.rank] if has_factors else [],
        "targets": sorted(matrices), "matrices": matrices, "build_seconds": round(seconds, 3),
        "versions": {"loftune": getattr(workers, "__version__", "0.1.0"), "torch": torch.__version__,
                     "ray": ray.__version__, "transformers": transformers.__version__,
                     "safetensors": safetensors.__version__},
    }


def model_json_files(source: ModelSource) -> dict[str, bytes]:
    """The JSON files an entry carries so that it needs nothing from the model's directory: 'config.json', and
    'tokenizer/<file>.json' for each file of the model's tokenizer (none when it has no tokenizer)."""
    try:
        tokenizer = source.tokenizer_files()
    except ValueError as exc:
        raise BuildInputError(str(exc)) from None
    with open(os.path.join(source.path, "config.json"), "rb") as f:
        files = {CONFIG_FILE: f.read()}
    return files | {f"{TOKENIZER_DIR}/{name}": data for name, data in tokenizer.items()}


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
        if not base.endswith(".safetensors") or (base.startswith("lora-r") and base != wanted_factor):
            continue
        tensors.update(cache.read_file(name, file, verify=verify))
    return tensors


def error_table(manifest: dict) -> str:
    """Per layer type (layer index folded to '*'): matrices, mean plain-quantization and final LoftQ error."""
    groups: dict[str, list[dict]] = {}
    for module, rec in manifest.get("matrices", {}).items():
        groups.setdefault(re.sub(r"\.\d+\.", ".*.", module), []).append(rec)
    width = max((len(k) for k in groups), default=10)
    lines = [f"{'layer':<{width}} {'n':>3} {'quant':>9} {'qlora_err':>9} {'final_err':>9} {'ratio':>6}"]
    for layer, recs in sorted(groups.items()):
        q = statistics.fmean(r["quant_error"] for r in recs)
        f = statistics.fmean(min(r["errors"]) if r["errors"] else r["quant_error"] for r in recs)
        ratio = f"{f / q:6.3f}" if q else f"{'-':>6}"  # the bf16 control has no error to reduce
        lines.append(f"{layer:<{width}} {len(recs):>3} {recs[0]['quant']:>9} {q:9.5f} {f:9.5f} {ratio}")
    return "\n".join(lines)
