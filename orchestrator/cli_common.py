"""What every `loftune` subcommand shares: exit codes, the one-line invalid-input error, printing the result,
opening the cache a flag names, and the flags every subcommand takes."""

from __future__ import annotations

import argparse
import json

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


class InvalidInputError(Exception):
    """Bad user input: reported in one line, exit code 2."""


def emit(args: argparse.Namespace, payload: dict | list, text: str) -> None:
    """The command's result: one JSON document with --json, else text; always on the real stdout."""
    print(json.dumps(payload) if args.json else text, file=args.stdout, flush=True)


def open_cache_flag(uri: str | None):
    """The cache that --cache names (default: $LOFTUNE_CACHE, else ~/.cache/loftune); a bad URI is invalid input."""
    from orchestrator.cache import BaseCache

    try:
        return BaseCache(uri)
    except ValueError as exc:
        raise InvalidInputError(f"--cache: {exc}") from exc


def add_spec_args(p: argparse.ArgumentParser) -> None:
    """SPEC and --set, for the subcommands that read a job spec."""
    p.add_argument("spec", metavar="SPEC", help="a YAML job spec")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set training.lr=1e-4 --set sweep.bits=[2,4] (repeatable)")


def add_common(p: argparse.ArgumentParser, cache: bool = True) -> None:
    """--json, and --cache where the subcommand reads the cache."""
    if cache:
        p.add_argument("--cache", default=None, help="cache URI (default $LOFTUNE_CACHE, else ~/.cache/loftune)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
