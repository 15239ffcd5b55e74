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

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


class InvalidInputError(Exception):
    """Bad user input: reported in one line, exit code 2."""


def _emit(args: argparse.Namespace, payload: dict | list, text: str) -> None:
    """The command's result: one JSON document with --json, else text; always on the real stdout."""
    print(json.dumps(payload) if args.json else text, file=args.out, flush=True)


# ---------------------------------------------------------------------------------------------- quantize


def cmd_quantize(args: argparse.Namespace) -> int:
    from orchestrator.build import BuildInputError, BuildRequest, ensure_base, error_table
    from workers.model_source import open_model
    from workers.quant import QuantSpec
    from workers.quant_plan import QuantPlan

    cache = _open_cache(args.cache)
    try:
        spec = QuantSpec(args.quant, args.bits, args.group_size, args.scale_dtype)
        plan = QuantPlan(spec, first_layers=args.first_layers, first_bits=args.first_bits)
        source = open_model(args.model, _local_work_dir(cache))
    except (ValueError, FileNotFoundError) as exc:
        raise InvalidInputError(str(exc)) from exc
    request = BuildRequest(source, plan, method=args.method, rank=args.rank, iters=args.iters,
                           targets=tuple(args.targets.split(",")), seed=args.seed)
    start = time.perf_counter()
    try:
        result = ensure_base(request, cache, actors=args.actors, threads_per_actor=args.threads,
                             address=args.address, progress=not args.json)
    except BuildInputError as exc:
        raise InvalidInputError(str(exc)) from exc
    payload = {"key": result.name, "uri": f"{result.uri.rstrip('/')}/bases/{result.name}", "built": result.built,
               "seconds": round(time.perf_counter() - start, 3),
               "matrices": len(result.manifest.get("matrices", {}))}
    text = "\n".join([error_table(result.manifest), "", *(f"{k}: {v}" for k, v in payload.items())])
    _emit(args, payload, text)
    return EXIT_OK


def _local_work_dir(cache) -> str:
    """Where built-in tiny models are materialized: beside a local cache, else in ~/.cache/loftune."""
    return cache.root if cache.is_local else os.path.expanduser("~/.cache/loftune")


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
    entries = cache.ls()
    lines = [f"{'entry':<70} {'MiB':>8} created"]
    lines += [f"{e['name']:<70} {e['bytes'] / 2**20:8.1f} {e.get('created', '')}" for e in entries]
    _emit(args, entries, "\n".join(lines) if entries else f"(no entries in {cache.uri})")
    return EXIT_OK


def _cache_show(cache, args) -> int:
    from orchestrator.build import error_table

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
    cache.rm(args.key)
    _emit(args, {"removed": args.key}, f"removed {args.key}")
    return EXIT_OK


def _cache_gc(cache, args) -> int:
    removed = cache.gc()
    _emit(args, {"removed": removed}, "\n".join(removed) or "nothing to collect")
    return EXIT_OK


CACHE_COMMANDS = {"ls": _cache_ls, "show": _cache_show, "verify": _cache_verify, "rm": _cache_rm, "gc": _cache_gc}


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loftune", description="Fine-tune low-bit LLMs on Ray (LoftQ, QA-LoRA).")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="build (or find) a quantized base in the cache")
    q.add_argument("--model", required=True, help="model directory, 'minilm-l6', 'tiny-llama' or 'tiny-bert'")
    q.add_argument("--quant", choices=["nf", "int"], required=True)
    q.add_argument("--bits", type=int, required=True)
    q.add_argument("--group-size", type=int, default=64)
    q.add_argument("--scale-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    q.add_argument("--method", default="loftq", choices=["loftq", "qlora", "qalora"])
    q.add_argument("--rank", type=int, default=16)
    q.add_argument("--iters", type=int, default=1)
    q.add_argument("--targets", default="all-linear", help="comma-separated module patterns, or all-linear")
    q.add_argument("--first-layers", type=int, default=0, help="mixed precision: this many first blocks ...")
    q.add_argument("--first-bits", type=int, default=None, help="... at these bits (the rest at --bits)")
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
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, help="cache URI (default $LOFTUNE_CACHE, else ~/.cache/loftune)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # libraries log to stdout (DeepSpeed, Ray): keep stdout for the result alone, so --json output parses
    args.out = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return args.func(args)
    except InvalidInputError as exc:
        print(f"loftune {args.command}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
