"""Ship a job to a Ray cluster through Ray's Job Submission API.

The job's working directory is built fresh: this project's code (`orchestrator/`, `workers/`) and the spec with
its `--set` overrides applied here. The entrypoint runs `loftune run` on the cluster (`--address auto`), so the
sweep, its progress and its results live there, in the job's working directory, a temporary folder that Ray
unpacks the upload into. So every path that reaches the job is made absolute first, against this machine's
working directory, the way `loftune run` here would read it: the model directory, the tasks' data files, a local
`cache.uri`, `--out`, and forwarded `LOFTUNE_CACHE` / `LOFTUNE_RUNS`. Those paths must exist at the same place on
the cluster (a shared volume, or the machine itself for a cluster on it). Without `--out`, the run directory is
`$LOFTUNE_RUNS/<name>` as the cluster sets it, else `<this directory>/runs/<name>`: never inside the job's
temporary folder, where results would be lost and each node would see a different one.

What travels besides: `LOFTUNE_CACHE`, `LOFTUNE_RUNS`, `LOFTUNE_S3_ENDPOINT` from this shell (they override the
cluster's own) and `HF_HUB_OFFLINE=1`. Credentials never do: the cluster's nodes have their own (KubeRay: a Secret).
The command is `--python` (default `python`: the one on the PATH of the Ray node that runs the job driver; start
Ray from the environment that has loftune's dependencies, or name its python).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
import tempfile
from typing import TYPE_CHECKING

import yaml

if TYPE_CHECKING:
    from orchestrator.errors import Problem

PROJECT_PACKAGES = ("orchestrator", "workers")
SPEC_NAME = "job.yaml"
FORWARDED_ENV = ("LOFTUNE_CACHE", "LOFTUNE_RUNS", "LOFTUNE_S3_ENDPOINT")  # where the job finds its storage
PATH_ENV = ("LOFTUNE_CACHE", "LOFTUNE_RUNS")  # forwarded values that are local paths (made absolute)


DATA_FILE_FIELDS = ("train_file", "eval_file")  # a task's data files: they may live on the cluster's volume alone


def _absolute(path: str) -> str:
    """A local path made absolute here; `~` and URI values as they are (`~` is the cluster's home there)."""
    from orchestrator.typed_yaml import absolute_path

    return absolute_path(path, expand_home=False)


def job_spec_data(spec_path: str, overrides: list[str]) -> dict:
    """The spec with its overrides applied and every local path made absolute (see the module docstring)."""
    from orchestrator.errors import SpecError
    from orchestrator.spec import absolute_local_paths, raw_spec

    data, problems = raw_spec(spec_path, overrides)
    if problems:
        raise SpecError(problems, spec_path)
    return absolute_local_paths(data, expand_home=False)


def missing_data_files(records: tuple[Problem, ...], data: dict) -> list[Problem]:
    """The problems (`orchestrator.errors.Problem`) about a task's data file that is not on this machine: the
    file named at that path of the spec `data` is no file here (it may be on the cluster's shared volume)."""
    from orchestrator.typed_yaml import path_parts, value_at

    def missing(problem: Problem) -> bool:
        parts = path_parts(problem.path)
        if len(parts) != 3 or parts[0] != "tasks" or parts[2] not in DATA_FILE_FIELDS:
            return False
        file = value_at(data, problem.path)
        return isinstance(file, str) and not os.path.isfile(os.path.expanduser(file))

    return [problem for problem in records if missing(problem)]


def job_spec_text(spec_path: str, overrides: list[str] | None = None) -> str:
    return yaml.safe_dump(job_spec_data(spec_path, overrides or []), sort_keys=False)


def validate_for_cluster(spec_path: str, overrides: list[str]) -> str:
    """Validate the spec here, except for data files this machine lacks: those may live on the cluster's
    shared volume, and the job checks them again there before any work (each is printed as a warning).
    Returns the job's name."""
    from orchestrator.errors import SpecError
    from orchestrator.spec import load_spec, raw_spec

    try:
        return load_spec(spec_path, overrides).name
    except SpecError as exc:
        data, _ = raw_spec(spec_path, overrides)  # the overrides' problems are among exc's
        elsewhere = missing_data_files(exc.records, data)
        if len(elsewhere) < len(exc.records):
            raise SpecError([p for p in exc.records if p not in elsewhere], exc.source) from None
        for problem in elsewhere:
            print(f"warning: {problem} on this machine; the cluster must have it", file=sys.stderr)
        return data["name"]


def _in_double_quotes(text: str) -> str:
    """`text` escaped for the inside of a POSIX shell's double quotes (where ${...} still expands)."""
    return re.sub(r'(["\\$`])', r"\\\1", text)


def entrypoint(python: str, out: str | None, name: str) -> str:
    """The job's shell command. Without `out`: `${LOFTUNE_RUNS:-<this directory>/runs}/<name>`, expanded on
    the cluster (Ray runs the entrypoint with a shell)."""
    command = shlex.join([python, "-m", "orchestrator.cli", "run", SPEC_NAME, "--address", "auto"])
    if out:
        return f"{command} --out {shlex.quote(out)}"
    fallback = _in_double_quotes(os.path.join(os.getcwd(), "runs"))
    return f'{command} --out "${{LOFTUNE_RUNS:-{fallback}}}"/{shlex.quote(name)}'


def job_env() -> dict[str, str]:
    """What the job's processes get from this shell: storage locations (paths made absolute), offline hub."""
    env = {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}
    for key in PATH_ENV:
        if key in env:
            env[key] = _absolute(env[key])
    env["HF_HUB_OFFLINE"] = "1"  # nothing downloads at run time; the cluster's own auth settings stay its own
    return env


def submit(client, spec_path: str, name: str, *, overrides: list[str], out: str | None, python: str = "python",
           job_id: str | None = None) -> str:
    """Submit `loftune run` of this spec to the cluster behind `client` (a JobSubmissionClient); returns the id."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = job_env()
    if out:
        out = _absolute(out)
    elif "LOFTUNE_RUNS" in env:
        out = os.path.join(env["LOFTUNE_RUNS"], name)
    with tempfile.TemporaryDirectory(prefix="loftune-job-") as tmp:
        for package in PROJECT_PACKAGES:
            shutil.copytree(os.path.join(root, package), os.path.join(tmp, package),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(tmp, SPEC_NAME), "w") as f:
            f.write(job_spec_text(spec_path, overrides))
        metadata = {"loftune_spec": name}
        if overrides:
            metadata["loftune_overrides"] = " ".join(shlex.quote(f"--set={item}") for item in overrides)
        return client.submit_job(entrypoint=entrypoint(python, out, name), submission_id=job_id,
                                 runtime_env={"working_dir": tmp, "env_vars": env}, metadata=metadata)
