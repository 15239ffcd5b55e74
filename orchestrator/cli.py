"""The `loftune` command line.

Exit codes: 0 ok, 2 invalid input (the message names the field or file), 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from orchestrator.errors import SpecError
from orchestrator.quiet import NoiseFilter, quiet_libraries

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2
# set by every command, never by an import (setdefault: a user's own wins, e.g. RAY_AUTH_MODE=token for a
# cluster's Job API); nothing downloads at run time
PROCESS_ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


class InvalidInputError(Exception):
    """Bad user input: reported in one line, exit code 2."""


def _emit(args: argparse.Namespace, payload: dict | list, text: str) -> None:
    """The command's result: one JSON document with --json, else text; always on the real stdout."""
    print(json.dumps(payload) if args.json else text, file=args.stdout, flush=True)


# ---------------------------------------------------------------------------------------------- quantize


QUANTIZE_FIELDS = ("kind", "bits", "group_size", "scale_dtype", "method", "rank", "iters", "targets")


def _quantization(args: argparse.Namespace):
    """The spec's `quantization:` section that the quantize flags give; a flag left out takes its default there."""
    from dataclasses import replace

    from orchestrator.spec import Mixed, Quantization

    given = {name: getattr(args, name) for name in QUANTIZE_FIELDS if getattr(args, name) is not None}
    if "targets" in given:
        given["targets"] = given["targets"].split(",")
    mixed = {name: value for name, value in (("first_layers", args.mixed_first_layers), ("bits", args.mixed_bits))
             if value is not None}
    return Quantization(**given, mixed=replace(Mixed(), **mixed) if mixed else None)


def cmd_quantize(args: argparse.Namespace) -> int:
    from orchestrator.build import BuildInputError, BuildRequest, ensure_base
    from orchestrator.entry import error_table
    from orchestrator.plan import quant_plan
    from orchestrator.run import work_dir
    from workers.model_source import open_model

    cache = _open_cache(args.cache)
    q = _quantization(args)
    try:
        plan = quant_plan(q, q.bits, q.group_size)  # QuantSpec and QuantPlan name an invalid field
        source = open_model(args.model, work_dir(cache))
    except (ValueError, FileNotFoundError) as exc:
        raise InvalidInputError(str(exc)) from exc
    request = BuildRequest(source, plan, method=q.method, rank=q.rank, iters=q.iters, targets=tuple(q.targets),
                           seed=args.seed)
    start = time.perf_counter()
    try:
        result = ensure_base(request, cache, actors=args.actors, threads_per_actor=args.threads,
                             address=args.address, progress=not args.json)
    except BuildInputError as exc:
        raise InvalidInputError(str(exc)) from exc
    if result.repaired:
        print(f"base {result.name}: broken ({result.repaired[0]}), rebuilt", file=sys.stderr)
    payload = {"key": result.name, "uri": f"{result.uri.rstrip('/')}/bases/{result.name}", "built": result.built,
               "seconds": round(time.perf_counter() - start, 3),
               "matrices": len(result.manifest.get("matrices", {})), "repaired": result.repaired}
    text = "\n".join([error_table(result.manifest), "", *(f"{k}: {v}" for k, v in payload.items())])
    _emit(args, payload, text)
    return EXIT_OK


def _open_cache(uri: str | None):
    from orchestrator.cache import BaseCache

    try:
        return BaseCache(uri)
    except ValueError as exc:
        raise InvalidInputError(f"--cache: {exc}") from exc


# ------------------------------------------------------------------------------------------------- cache


def cmd_cache(args: argparse.Namespace) -> int:
    from orchestrator.cache import CacheError

    cache = _open_cache(args.cache)
    try:
        return CACHE_COMMANDS[args.cache_command](cache, args)
    except CacheError as exc:
        print(f"loftune cache {args.cache_command}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from exc


def _cache_ls(cache, args) -> int:
    entries = cache.ls()  # broken and foreign entries too, each with its status and first problem
    lines = [f"{'entry':<70} {'status':<7} {'MiB':>8} created"]
    for e in entries:
        mib = f"{e['bytes'] / 2**20:8.1f}" if e["bytes"] is not None else f"{'-':>8}"
        lines.append(f"{e['name']:<70} {e['status']:<7} {mib} {e['created'] or ''}")
        if e["problem"]:
            lines.append(f"  {e['problem']}")
    _emit(args, entries, "\n".join(lines) if entries else f"(no entries in {cache.uri})")
    return EXIT_OK


def _cache_show(cache, args) -> int:
    from orchestrator.entry import error_table

    manifest = cache.show(args.key)
    _emit(args, manifest, json.dumps({k: v for k, v in manifest.items() if k != "matrices"}, indent=1)
          + "\n\n" + error_table(manifest))
    return EXIT_OK


def _cache_verify(cache, args) -> int:
    problems = cache.verify(args.key)
    _emit(args, {"ok": not problems, "problems": problems},
          "\n".join(problems) if problems else f"ok: {args.key or 'all entries'} verified")
    return EXIT_FAILURE if problems else EXIT_OK


def _cache_rm(cache, args) -> int:
    what = cache.rm(args.key)  # 'link' for a foreign entry: only the link inside the cache went
    _emit(args, {"removed": args.key, "what": what},
          f"removed {args.key}" + (" (a link: what it pointed to was left alone)" if what == "link" else ""))
    return EXIT_OK


def _cache_gc(cache, args) -> int:
    removed = cache.gc()
    _emit(args, {"removed": removed}, "\n".join(removed) or "nothing to collect")
    return EXIT_OK


CACHE_COMMANDS = {"ls": _cache_ls, "show": _cache_show, "verify": _cache_verify, "rm": _cache_rm, "gc": _cache_gc}



# ------------------------------------------------------------------------------------- validate / run


def _load(args: argparse.Namespace):
    """The spec named on the command line, with its --set overrides (SpecError -> exit 2)."""
    from orchestrator.spec import load_spec

    return load_spec(args.spec, args.set)


def cmd_validate(args: argparse.Namespace) -> int:
    from orchestrator.run import prepare

    spec = _load(args)
    plan = prepare(spec, args.address)
    payload = {"ok": True, "name": spec.name, "trials": len(plan.trials), "bases": len(plan.bases)}
    _emit(args, payload, f"ok: {args.spec}: {len(plan.trials)} trial(s) on {len(plan.bases)} base(s)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.run import execute
    from orchestrator.run_dir import default_run_dir

    spec = _load(args)
    run_dir = args.out or default_run_dir(spec)
    if args.dry_run:
        return _dry_run(args, spec, run_dir)
    summary = execute(spec, run_dir, address=args.address)
    from orchestrator.results import format_table

    text = "\n".join([format_table(summary.rows), "",
                      f"run directory: {summary.run_dir}" + (" (resumed)" if summary.resumed else ""),
                      f"bases built: {len(summary.built)}, found in the cache: {len(summary.cached)}"
                      + (f", LoftQ factor sets added: {len(summary.factors)}" if summary.factors else ""),
                      *(f"best {task}: {path}" for task, path in summary.best.items())])
    _emit(args, summary.to_dict(), text)
    if summary.failed:
        print(f"loftune run: {len(summary.failed)} trial(s) did not finish: {', '.join(summary.failed)}",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _dry_run(args: argparse.Namespace, spec, run_dir: str) -> int:
    from orchestrator.plan import max_concurrent
    from orchestrator.run import base_status, open_cache, prepare
    from orchestrator.run_dir import FINISHED, SPEC_FILE, check_run_dir
    from orchestrator.trial_records import read_states

    check_run_dir(run_dir)
    plan = prepare(spec, args.address)
    cache = open_cache(spec)
    bases = base_status(plan, cache)
    resumes = os.path.exists(os.path.join(run_dir, SPEC_FILE))
    recorded = {s.trial["id"]: s.status for s in read_states(run_dir)} if resumes else {}
    trials = [{**t.to_dict(), "max_steps": plan.training_for(t).max_steps,
               "action": "kept" if recorded.get(t.id) in FINISHED else "resume" if t.id in recorded else "run"}
              for t in plan.trials]
    payload = {"run_dir": run_dir, "resumes": resumes, "trials": trials, "bases": bases}
    lines = [f"run directory: {run_dir}" + (" (exists: the run resumes)" if resumes else ""),
             f"cache: {cache.uri}", "", f"{len(bases)} base(s):"]
    lines += [f"  {name}  [{status}]" for name, status in bases.items()]
    lines += ["", f"{len(trials)} trial(s):"]
    width = max((len(t["id"]) for t in trials), default=0)
    lines += [f"  {t['id']:<{width}}  {t['max_steps']:>6} steps  on {t['base']}  [{t['action']}]" for t in trials]
    if not args.address:
        lines += ["", f"embedded Ray: {max_concurrent(spec, plan.cluster)} trial(s) at a time"]
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def cmd_results(args: argparse.Namespace) -> int:
    from orchestrator.results import format_table
    from orchestrator.run import collect_results, open_cache
    from orchestrator.run_dir import read_run_spec

    spec = read_run_spec(args.run_dir)
    summary = collect_results(args.run_dir, spec, open_cache(spec), export=False)
    text = format_table(summary.rows)
    if summary.not_started:
        text += f"\n\n{summary.not_started} of {summary.planned} planned trial(s) not started yet"
    _emit(args, summary.to_dict(), text)
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from orchestrator.export_model import ExportError, base_source, choose_trials, trial_source, write_export

    if (args.run_dir is None) == (args.base is None):
        raise InvalidInputError("expected a RUN_DIR or --base KEY (one of them)")
    if args.base is not None and (args.task or args.trial):
        raise InvalidInputError("--task / --trial choose a trial of a RUN_DIR; with --base there is none")
    written = []
    try:
        if args.base is not None:
            written.append(write_export(base_source(_open_cache(args.cache), args.base, args.rank), args.out,
                                        args.format, gguf_type=args.gguf_type))
        else:
            from orchestrator.run import open_cache
            from orchestrator.run_dir import read_run_spec

            spec = read_run_spec(args.run_dir)
            cache = _open_cache(args.cache) if args.cache else open_cache(spec)
            records = choose_trials(args.run_dir, spec, args.task, args.trial)
            for record in records:  # several tasks: one folder each
                out = args.out if len(records) == 1 else os.path.join(args.out, record.trial.task)
                print(f"exporting {record.trial.id} ({args.format}) to {out}", file=sys.stderr)
                written.append(write_export(trial_source(spec, record, cache), out, args.format,
                                            gguf_type=args.gguf_type))
    except ExportError as exc:
        raise InvalidInputError(str(exc)) from None
    _emit(args, {"exported": written}, "\n".join(f"exported: {w}" for w in written))
    return EXIT_OK


# ------------------------------------------------------------------------------ jobs on a Ray cluster


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        raise InvalidInputError(f"--address: cannot reach the Ray job server at {address}: {exc}") from None


def cmd_submit(args: argparse.Namespace) -> int:
    from orchestrator.submit import submit, validate_for_cluster

    name = validate_for_cluster(args.spec, args.set)
    job_id = submit(_client(args.address), args.spec, name, overrides=args.set, out=args.out,
                    python=args.python, job_id=args.job_id)
    _emit(args, {"job_id": job_id, "address": args.address},
          f"submitted {job_id}\n  loftune status {job_id} --address {args.address}\n"
          f"  loftune logs {job_id} --address {args.address} --follow")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    info = _job_call(args, lambda c: c.get_job_info(args.job_id))
    payload = {"job_id": args.job_id, "status": str(info.status.value), "message": info.message,
               "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time}
    _emit(args, payload, f"{args.job_id}: {payload['status']}" + (f" ({info.message})" if info.message else ""))
    return EXIT_OK


def cmd_logs(args: argparse.Namespace) -> int:
    if args.follow:
        import asyncio

        async def tail() -> None:
            async for chunk in _job_call(args, lambda c: c.tail_job_logs(args.job_id)):
                print(chunk, end="", file=args.stdout, flush=True)

        asyncio.run(tail())
        return EXIT_OK
    logs = _job_call(args, lambda c: c.get_job_logs(args.job_id))
    _emit(args, {"job_id": args.job_id, "logs": logs}, logs.rstrip("\n"))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = _job_call(args, lambda c: c.stop_job(args.job_id))
    _emit(args, {"job_id": args.job_id, "stopped": bool(stopped)},
          f"{args.job_id}: {'stop requested' if stopped else 'not running'}")
    return EXIT_OK


def _job_call(args: argparse.Namespace, call):
    """Call the job server; an unknown job id is invalid input (exit 2), not a traceback."""
    client = _client(args.address)
    try:
        return call(client)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc):
            raise InvalidInputError(f"JOB_ID: no job {args.job_id!r} on {args.address}") from None
        raise

# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loftune", description="Fine-tune low-bit LLMs on Ray (LoftQ, QA-LoRA).")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="build (or find) a quantized base in the cache",
                       description="Each flag is the field of a job spec's quantization section of the same name, "
                                   "and a flag left out takes that field's default.")
    q.add_argument("--model", required=True, help="model directory, 'minilm-l6', 'tiny-llama' or 'tiny-bert'")
    q.add_argument("--kind", "--quant", choices=["nf", "int"], help="the quantizer")
    q.add_argument("--bits", type=int)
    q.add_argument("--group-size", type=int)
    q.add_argument("--scale-dtype", choices=["float16", "bfloat16", "float32"])
    q.add_argument("--method", choices=["loftq", "qlora", "qalora"])
    q.add_argument("--rank", type=int)
    q.add_argument("--iters", type=int)
    q.add_argument("--targets", help="comma-separated module patterns, or all-linear")
    q.add_argument("--mixed-first-layers", "--first-layers", type=int, help="mixed precision: this many first "
                                                                             "blocks ...")
    q.add_argument("--mixed-bits", "--first-bits", type=int, help="... at these bits (the rest at --bits)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--actors", type=int, default=None, help="build actors (default: one per GPU, else per CPU)")
    q.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per CPU actor")
    q.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    _common(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("cache", help="inspect and maintain the cache of quantized bases")
    csub = c.add_subparsers(dest="cache_command", required=True)
    for name, needs_key in (("ls", None), ("show", True), ("verify", False), ("rm", True), ("gc", None)):
        p = csub.add_parser(name)
        if needs_key is not None:
            p.add_argument("key", nargs=None if needs_key else "?", default=None)
        _common(p)
    c.set_defaults(func=cmd_cache)

    v = sub.add_parser("validate", help="check a job spec (and its plan) without running anything")
    _spec_args(v)
    v.add_argument("--address", default=None, help="check that a trial fits this Ray cluster (default: this machine)")
    _common(v, cache=False)
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run (or resume) a job: build its bases, sweep its trials, report")
    _spec_args(r)
    r.add_argument("--out", default=None, help="run directory (default $LOFTUNE_RUNS/<name>, else runs/<name>)")
    r.add_argument("--address", default=None, help="Ray cluster address, or 'auto' (default: embedded local Ray)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (trials, bases, cached or not) and stop")
    _common(r, cache=False)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("submit", help="submit a job to a Ray cluster through its Job Submission API")
    _spec_args(s)
    s.add_argument("--address", required=True, help="the job server, e.g. http://HEAD:8265")
    s.add_argument("--out", default=None, help="run directory on the cluster (default $LOFTUNE_RUNS/<name> there)")
    s.add_argument("--python", default="python", help="the cluster's python that has loftune's dependencies")
    s.add_argument("--job-id", default=None, help="submission id (default: generated by Ray)")
    _common(s, cache=False)
    s.set_defaults(func=cmd_submit)

    for name, func, what in (("status", cmd_status, "a submitted job's status"),
                             ("logs", cmd_logs, "a submitted job's logs"),
                             ("stop", cmd_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=what)
        p.add_argument("job_id", metavar="JOB_ID")
        p.add_argument("--address", required=True, help="the job server, e.g. http://HEAD:8265")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
        _common(p, cache=False)
        p.set_defaults(func=func)

    e = sub.add_parser("export", help="write a trial's model (or a cached base) for transformers + peft or llama.cpp")
    e.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None, help="a run directory")
    e.add_argument("--task", default=None, help="the best trial of this task (default: of every task)")
    e.add_argument("--trial", default=None, help="this trial id instead of the best")
    e.add_argument("--base", default=None, metavar="KEY", help="a cache entry instead of a run (LoftQ-initialized)")
    e.add_argument("--rank", type=int, default=None, help="with --base: which LoftQ factors (default: the only)")
    e.add_argument("--out", required=True, help="the export directory (new, empty, or an earlier export)")
    e.add_argument("--format", choices=["peft", "hf", "gguf"], default="peft",
                   help="peft: base/ + adapter/; hf: merged model; gguf: one .gguf for llama.cpp")
    e.add_argument("--gguf-type", choices=["f16", "q8_0"], default=None,
                   help="gguf weight type (default f16; a QA-LoRA INT4 g32 trial: Q4_1 from its merged codes)")
    _common(e)
    e.set_defaults(func=cmd_export)

    res = sub.add_parser("results", help="leaderboard and plots of a run directory (finished or not)")
    res.add_argument("run_dir", metavar="RUN_DIR")
    _common(res, cache=False)
    res.set_defaults(func=cmd_results)
    return parser


def _spec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", metavar="SPEC", help="a YAML job spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set training.lr=1e-4 --set sweep.bits=[2,4] (repeatable)")


def _common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    if cache:
        p.add_argument("--cache", default=None, help="cache URI (default $LOFTUNE_CACHE, else ~/.cache/loftune)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def setup_process() -> None:
    """The process-wide settings of a loftune command, made before it imports Ray or Hugging Face libraries:
    PROCESS_ENV, and library noise off (orchestrator/quiet.py). Ray workers inherit the environment."""
    for key, value in PROCESS_ENV.items():
        os.environ.setdefault(key, value)
    quiet_libraries()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # libraries log to stdout (DeepSpeed, Ray): keep stdout for the result alone, so --json output parses
    args.stdout = sys.stdout
    setup_process()
    try:
        with contextlib.redirect_stderr(NoiseFilter(sys.stderr)) as terminal, contextlib.redirect_stdout(terminal):
            return args.func(args)
    except InvalidInputError as exc:
        print(f"loftune {args.command}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except SpecError as exc:  # every problem of a spec, each naming its field
        source = getattr(args, "spec", None) if exc.source == "spec" else exc.source
        print(f"loftune {args.command}: {exc.describe(source or exc.source)}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        detail = (" (built bases and finished trials are kept; interrupted trials continue from their last "
                  "checkpoint)" if args.command == "run" else "")
        print(f"loftune {args.command}: interrupted; run the same command again to resume{detail}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # failures with a clear cause get one line, not a traceback; bugs keep theirs
        from orchestrator.cache import CacheError

        if isinstance(exc, CacheError | ConnectionError):
            print(f"loftune {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
            return EXIT_FAILURE
        if isinstance(exc, OSError) and exc.strerror:  # a full disk, a read-only mount, a permission
            where = f": {exc.filename}" if exc.filename else ""
            print(f"loftune {args.command}: {exc.strerror}{where}", file=sys.stderr)
            return EXIT_FAILURE
        raise


if __name__ == "__main__":
    sys.exit(main())
