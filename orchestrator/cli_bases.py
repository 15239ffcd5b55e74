"""`loftune quantize` and `loftune cache ...`: building one base into the cache, and looking after the cache."""

from __future__ import annotations

import argparse
import json
import sys
import time

from orchestrator.cli_common import (
    EXIT_FAILURE,
    EXIT_OK,
    InvalidInputError,
    add_common,
    emit,
    open_cache_flag,
)
from workers.entry_format import METHODS

QUANTIZE_FIELDS = ("kind", "bits", "group_size", "scale_dtype", "method", "rank", "iters", "targets")
# quantization.calibration's fields: flag --calibration-<field>
CALIBRATION_FIELDS = ("file", "column", "samples", "max_length", "damping")


def _quantization(args: argparse.Namespace):
    """The spec's `quantization:` section that the quantize flags give; a flag left out takes its default there."""
    from dataclasses import replace

    from orchestrator.spec import Calibration, Mixed, Quantization

    given = {name: getattr(args, name) for name in QUANTIZE_FIELDS if getattr(args, name) is not None}
    if "targets" in given:
        given["targets"] = given["targets"].split(",")
    mixed = {name: value for name, value in (("first_layers", args.mixed_first_layers), ("bits", args.mixed_bits))
             if value is not None}
    calibration = {name: getattr(args, f"calibration_{name}") for name in CALIBRATION_FIELDS
                   if getattr(args, f"calibration_{name}") is not None}
    return Quantization(**given, mixed=replace(Mixed(), **mixed) if mixed else None,
                        calibration=replace(Calibration(), **calibration) if calibration else None)


def _calibration_data(q):
    """The calibration data the --calibration-* flags name, else None: it weights a calibrated method's step and
    scores any other method's base (output errors in the manifest). Flags without a file are invalid input, and
    so is a calibrated method without one."""
    from orchestrator.plan import file_calibration_source
    from workers.calibration import CalibrationError, read_calibration
    from workers.entry_format import CALIBRATED_METHODS

    c = q.calibration
    if c is None and q.method not in CALIBRATED_METHODS:
        return None
    if c is None or c.file is None:
        why = f"method {q.method!r} needs calibration data" if q.method in CALIBRATED_METHODS else \
            "the other --calibration-* flags need the data"
        raise InvalidInputError(f"--calibration-file: {why}: a json/jsonl/csv/parquet file (and "
                                f"--calibration-column, default 'text')")
    try:
        return read_calibration(file_calibration_source(c))
    except CalibrationError as exc:
        raise InvalidInputError(f"--{exc.field.replace('.', '-').replace('_', '-')}: {exc.message}") from None


def cmd_quantize(args: argparse.Namespace) -> int:
    from orchestrator.build import BuildInputError, BuildRequest, ensure_base
    from orchestrator.entry import error_table
    from orchestrator.plan import quant_plan
    from orchestrator.run import work_dir
    from workers.model_source import open_model

    cache = open_cache_flag(args.cache)
    q = _quantization(args)
    try:
        plan = quant_plan(q, q.bits, q.group_size)  # QuantSpec and QuantPlan name an invalid field
        source = open_model(args.model, work_dir(cache))
    except (ValueError, FileNotFoundError) as exc:
        raise InvalidInputError(str(exc)) from exc
    request = BuildRequest(source, plan, method=q.method, rank=q.rank, iters=q.iters, targets=tuple(q.targets),
                           seed=args.seed, calibration=_calibration_data(q))
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
    emit(args, payload, text)
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    from orchestrator.cache import CacheError

    cache = open_cache_flag(args.cache)
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
    emit(args, entries, "\n".join(lines) if entries else f"(no entries in {cache.uri})")
    return EXIT_OK


def _cache_show(cache, args) -> int:
    from orchestrator.entry import error_table

    manifest = cache.show(args.key)
    emit(args, manifest, json.dumps({k: v for k, v in manifest.items() if k != "matrices"}, indent=1)
          + "\n\n" + error_table(manifest))
    return EXIT_OK


def _cache_verify(cache, args) -> int:
    problems = cache.verify(args.key)
    emit(args, {"ok": not problems, "problems": problems},
          "\n".join(problems) if problems else f"ok: {args.key or 'all entries'} verified")
    return EXIT_FAILURE if problems else EXIT_OK


def _cache_rm(cache, args) -> int:
    what = cache.rm(args.key)  # 'link' for a foreign entry: only the link inside the cache went
    emit(args, {"removed": args.key, "what": what},
          f"removed {args.key}" + (" (a link: what it pointed to was left alone)" if what == "link" else ""))
    return EXIT_OK


def _cache_gc(cache, args) -> int:
    removed = cache.gc()
    emit(args, {"removed": removed}, "\n".join(removed) or "nothing to collect")
    return EXIT_OK


CACHE_COMMANDS = {"ls": _cache_ls, "show": _cache_show, "verify": _cache_verify, "rm": _cache_rm, "gc": _cache_gc}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The quantize and cache subcommands."""
    q = sub.add_parser("quantize", help="build (or find) a quantized base in the cache",
                       description="Each flag is the field of a job spec's quantization section of the same name, "
                                   "and a flag left out takes that field's default.")
    q.add_argument("--model", required=True, help="model directory, 'minilm-l6', 'tiny-llama' or 'tiny-bert'")
    q.add_argument("--kind", "--quant", choices=["nf", "int"], help="the quantizer")
    q.add_argument("--bits", type=int)
    q.add_argument("--group-size", type=int)
    q.add_argument("--scale-dtype", choices=["float16", "bfloat16", "float32"])
    q.add_argument("--method", choices=list(METHODS))
    q.add_argument("--rank", type=int)
    q.add_argument("--iters", type=int)
    q.add_argument("--targets", help="comma-separated module patterns, or all-linear")
    q.add_argument("--mixed-first-layers", "--first-layers", type=int, help="mixed precision: this many first "
                                                                             "blocks ...")
    q.add_argument("--mixed-bits", "--first-bits", type=int, help="... at these bits (the rest at --bits)")
    q.add_argument("--calibration-file", help="texts whose layer inputs weight cloq's low-rank step; with another "
                                              "method they score the base (output errors in the manifest). json / "
                                              "jsonl / csv / parquet")
    q.add_argument("--calibration-column", help="the file's text column (default 'text')")
    q.add_argument("--calibration-samples", type=int, help="how many texts (default 128)")
    q.add_argument("--calibration-max-length", type=int, help="tokens per text (default 512)")
    q.add_argument("--calibration-damping", type=float, help="the weighted step's damping, x mean(diag X^T X) "
                                                             "(default 1)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--actors", type=int, default=None, help="build actors (default: one per GPU, else per CPU)")
    q.add_argument("--threads", type=int, default=1, help="torch threads (and CPUs) per CPU actor")
    q.add_argument("--address", default=None, help="Ray cluster address (default: embedded local Ray)")
    add_common(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("cache", help="inspect and maintain the cache of quantized bases")
    csub = c.add_subparsers(dest="cache_command", required=True)
    for name, needs_key in (("ls", None), ("show", True), ("verify", False), ("rm", True), ("gc", None)):
        p = csub.add_parser(name)
        if needs_key is not None:
            p.add_argument("key", nargs=None if needs_key else "?", default=None)
        add_common(p)
    c.set_defaults(func=cmd_cache)
