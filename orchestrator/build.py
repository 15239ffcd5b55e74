"""Build a model's quantized base once, spreading per-matrix LoftQ over Ray actors, into the shared cache.

    request -> key -> intact cache hit? done : lock -> plan the matrices -> actors (largest first) -> shards -> manifest

A hit is checked before it is trusted: every file's size (and its sha256 with `verify_hashes`, which the driver of
a run asks for once per entry). A broken entry is rebuilt under its lock: it is content-addressed, so the rebuild
is identical. An entry is self-contained: it carries the model's config and tokenizer as JSON files
(orchestrator/entry.py names the files and reads them), so a cache that was copied or mounted elsewhere still trains.

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
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import ray
import torch
from tqdm import tqdm

from orchestrator.build_request import (  # noqa: F401  (the build's API: callers import these from here too)
    FULL_PRECISION_QUANT,
    BuildInputError,
    BuildRequest,
    BuildResult,
)
from orchestrator.cache import BaseCache, BaseCacheKey, CacheCorruptError, CacheError, CacheForeignError
from orchestrator.calibrate import calibration_record, gather_build_grams, put_grams
from orchestrator.entry import (
    CONFIG_FILE,
    REST_FILE,
    TOKENIZER_DIR,
    base_shard_file,
    factor_file,
    factor_ranks,
)
from workers.entry_format import ALL_METHODS, FULL_PRECISION_METHOD, METHODS, is_factor
from workers.matrix_worker import FULL_PRECISION_DTYPE, MatrixJob, MatrixResult, MatrixWorker
from workers.model_source import ModelSource
from workers.quant import packed_nbytes
from workers.quant_plan import method_problem

SHARD_BYTES = 1 << 30


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
    if request.method not in ALL_METHODS:
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
    method = None if request.plan is None else method_problem(request.method, request.plan.base.kind)
    problems += [f"method: {method}"] if method else []
    if problems:
        raise BuildInputError("cannot build this base:\n  " + "\n  ".join(problems))
    damping = None if request.calibration is None else request.calibration.damping
    jobs = [MatrixJob(m, None if request.plan is None else request.plan.spec_for(m), request.rank,
                      request.effective_iters, request.method, request.seed, damping=damping) for m in modules]
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
    calibration, gram_refs = None, {}
    # before the actors start: the driver runs the model once (data that only scores the base is skipped when
    # only factors are added: their matrices are not recorded)
    if request.calibration is not None and (manifest is None or request.calibrated):
        calibration = gather_build_grams(request, [j.module for j in jobs], progress,
                                         on_grams=lambda grams: gram_refs.update(put_grams(grams)))
    bar = tqdm(total=len(jobs), desc=f"quantize {key.name}", unit="matrix", disable=not progress, file=sys.stderr)
    pool = _ActorPool(_start_actors(actors, threads_per_actor, len(jobs)), bar, on_progress, gram_refs)
    try:
        if manifest is None:
            return _build_entry(request, key, cache, jobs, shapes, pool, shard_bytes, model_files, calibration)
        return _build_factors(request, manifest, cache, jobs, pool)
    finally:
        bar.close()
        for actor in pool.actors:
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
    return not request.stores_factors or request.rank in factor_ranks(manifest)


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


@dataclass
class _ActorPool:
    """The build actors, the progress they report to, and the calibrated method's Gram matrices (object refs)."""

    actors: list
    bar: tqdm
    on_progress: Callable[[int, int], None] | None
    grams: dict = field(default_factory=dict)  # module -> ObjectRef of its input Gram matrix (cloq)

    def results(self, source: ModelSource, jobs: list[MatrixJob]):
        """Yield results as they come back, keeping at most two matrices in flight per actor."""
        queue = list(reversed(jobs))
        in_flight: dict[ray.ObjectRef, int] = {}

        def submit(actor_index: int) -> None:
            job = queue.pop()
            inputs = [ray.put(source.read(job.module + ".weight"))]
            inputs += [self.grams[job.module]] if job.module in self.grams else []
            in_flight[self.actors[actor_index].quantize.remote(job, *inputs)] = actor_index

        for i in range(min(len(jobs), 2 * len(self.actors))):
            submit(i % len(self.actors))
        done = 0
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            actor_index = in_flight.pop(ready[0])
            result: MatrixResult = ray.get(ready[0])
            if queue:
                submit(actor_index)
            done += 1
            self.bar.update(1)
            if self.on_progress:
                self.on_progress(done, len(jobs))
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


def _build_entry(request, key, cache, jobs, shapes, pool, shard_bytes, model_files, calibration) -> dict:
    build_start = time.perf_counter()
    shard_of = _shard_plan(jobs, shapes, shard_bytes)
    remaining = Counter(shard_of.values())
    buffers: dict[int, dict[str, torch.Tensor]] = {s: {} for s in remaining}
    factors: dict[str, torch.Tensor] = {}
    matrices: dict[str, dict] = {}
    with cache.writer(key) as writer:
        for file, data in model_files.items():
            writer.add_json(file, data)
        for result in pool.results(request.source, jobs):
            shard = shard_of[result.module]
            for name, tensor in result.tensors.items():
                (factors if is_factor(name) else buffers[shard])[name] = tensor
            matrices[result.module] = _matrix_record(result, shapes, request)
            remaining[shard] -= 1
            if remaining[shard] == 0:
                writer.add_file(base_shard_file(shard), buffers.pop(shard))
        quantized = {m + ".weight" for m in shard_of}
        rest = {name: request.source.read(name) for name in request.source.tensors if name not in quantized}
        writer.add_file(REST_FILE, rest)
        if factors:
            writer.add_file(factor_file(request.rank), factors)
        extra = _manifest_extra(request, matrices, time.perf_counter() - build_start, bool(factors))
        return writer.commit({**extra, **calibration_record(request, calibration)})


def _build_factors(request, manifest, cache, jobs, pool) -> dict:
    """Add LoftQ factors for another rank to a rank-independent (iters <= 1) base (we hold its lock)."""
    factors: dict[str, torch.Tensor] = {}
    for result in pool.results(request.source, jobs):
        factors.update({k: v for k, v in result.tensors.items() if is_factor(k)})
    update = {"factor_ranks": sorted({*factor_ranks(manifest), request.rank})}
    return cache.add_files(manifest["name"], {factor_file(request.rank): factors}, update)


def _matrix_record(result: MatrixResult, shapes: dict, request: BuildRequest) -> dict:
    quant = request.label if request.plan is None else request.plan.spec_for(result.module).name
    record = {"shape": list(shapes[result.module]), "quant": quant, "quant_error": result.quant_error,
              "errors": result.errors, "seconds": round(result.seconds, 4), "device": result.device,
              "node": result.node}
    if result.output_error is not None:  # calibration data was there: the final error in both norms
        record["weight_error"], record["output_error"] = result.weight_error, result.output_error
    return record


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
