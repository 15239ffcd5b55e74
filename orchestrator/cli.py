"""The `loftune` command line.

Exit codes: 0 ok, 2 invalid input (the message names the field or file), 1 failure.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

from orchestrator import cli_bases, cli_jobs
from orchestrator.cli_common import (
    EXIT_FAILURE,
    EXIT_INVALID,
    EXIT_OK,
    InvalidInputError,
    add_common,
    add_spec_args,
    emit,
    open_cache_flag,
)
from orchestrator.errors import SpecError
from orchestrator.quiet import NoiseFilter, quiet_libraries

# set by every command, never by an import (setdefault: a user's own wins, e.g. RAY_AUTH_MODE=token for a
# cluster's Job API); nothing downloads at run time
PROCESS_ENV = {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


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
    emit(args, payload, f"ok: {args.spec}: {len(plan.trials)} trial(s) on {len(plan.bases)} base(s)")
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
    emit(args, summary.to_dict(), text)
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
    emit(args, payload, "\n".join(lines))
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
    emit(args, summary.to_dict(), text)
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
            written.append(write_export(base_source(open_cache_flag(args.cache), args.base, args.rank), args.out,
                                        args.format, gguf_type=args.gguf_type))
        else:
            from orchestrator.run import open_cache
            from orchestrator.run_dir import read_run_spec

            spec = read_run_spec(args.run_dir)
            cache = open_cache_flag(args.cache) if args.cache else open_cache(spec)
            records = choose_trials(args.run_dir, spec, args.task, args.trial)
            for record in records:  # several tasks: one folder each
                out = args.out if len(records) == 1 else os.path.join(args.out, record.trial.task)
                print(f"exporting {record.trial.id} ({args.format}) to {out}", file=sys.stderr)
                written.append(write_export(trial_source(spec, record, cache), out, args.format,
                                            gguf_type=args.gguf_type))
    except ExportError as exc:
        raise InvalidInputError(str(exc)) from None
    emit(args, {"exported": written}, "\n".join(f"exported: {w}" for w in written))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loftune", description="Fine-tune low-bit LLMs on Ray (LoftQ, QA-LoRA).")
    sub = parser.add_subparsers(dest="command", required=True)
    cli_bases.add_parsers(sub)
    v = sub.add_parser("validate", help="check a job spec (and its plan) without running anything")
    add_spec_args(v)
    v.add_argument("--address", default=None, help="check that a trial fits this Ray cluster (default: this machine)")
    add_common(v, cache=False)
    v.set_defaults(func=cmd_validate)

    r = sub.add_parser("run", help="run (or resume) a job: build its bases, sweep its trials, report")
    add_spec_args(r)
    r.add_argument("--out", default=None, help="run directory (default $LOFTUNE_RUNS/<name>, else runs/<name>)")
    r.add_argument("--address", default=None, help="Ray cluster address, or 'auto' (default: embedded local Ray)")
    r.add_argument("--dry-run", action="store_true", help="print the plan (trials, bases, cached or not) and stop")
    add_common(r, cache=False)
    r.set_defaults(func=cmd_run)

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
    add_common(e)
    e.set_defaults(func=cmd_export)

    res = sub.add_parser("results", help="leaderboard and plots of a run directory (finished or not)")
    res.add_argument("run_dir", metavar="RUN_DIR")
    add_common(res, cache=False)
    res.set_defaults(func=cmd_results)
    cli_jobs.add_parsers(sub)
    return parser


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
