"""`loftune quantize` and `loftune cache` as a user runs them: real processes, real Ray, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def loftune(*args: str, cache: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "orchestrator.cli", *args]
    env = dict(os.environ, LOFTUNE_CACHE=cache, RAY_AUTH_MODE="disabled")
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_quantize_build_hit_and_cache_commands(tmp_path):
    cache = str(tmp_path / "cache")
    args = ["quantize", "--model", "tiny-llama", "--quant", "nf", "--bits", "2", "--group-size", "64",
            "--rank", "4", "--iters", "2", "--actors", "2", "--json"]
    first = loftune(*args, cache=cache)
    assert first.returncode == 0, first.stderr
    built = json.loads(first.stdout)
    assert built["built"] is True and built["key"].startswith("tiny-llama__nf2-g64__loftq-t2-r4__")
    assert built["uri"].endswith("/bases/" + built["key"]) and built["seconds"] > 0
    hit = json.loads(loftune(*args, cache=cache).stdout)
    assert hit["built"] is False and hit["key"] == built["key"]

    listing = json.loads(loftune("cache", "ls", "--json", cache=cache).stdout)
    assert [e["name"] for e in listing] == [built["key"]]
    manifest = json.loads(loftune("cache", "show", built["key"], "--json", cache=cache).stdout)
    assert len(manifest["matrices"]) == 14
    assert loftune("cache", "verify", built["key"], cache=cache).returncode == 0

    shard = next(p for p in manifest["files"] if p.endswith("base-00000.safetensors"))
    path = os.path.join(cache, "bases", built["key"], shard)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(b"\x00\x01\x02\x03")
    bad = loftune("cache", "verify", built["key"], "--json", cache=cache)
    assert bad.returncode == 1 and "base-00000.safetensors" in bad.stdout

    assert loftune("cache", "rm", built["key"], cache=cache).returncode == 0
    assert json.loads(loftune("cache", "ls", "--json", cache=cache).stdout) == []


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--quant", "nf", "--bits", "8"], "QuantSpec.bits"),
        (["--quant", "int", "--bits", "4", "--group-size", "96"], "group_size=96"),
        (["--quant", "nf", "--bits", "4", "--model", "/no/such/model"], "/no/such/model"),
        (["--quant", "nf", "--bits", "4", "--method", "qalora"], "qalora"),
        (["--quant", "fp", "--bits", "4"], "--quant"),
    ],
)
def test_quantize_invalid_input_exits_2_and_names_the_problem(tmp_path, args, needle):
    base = ["quantize", "--model", "tiny-llama", "--rank", "4", "--iters", "1"]
    if "--model" in args:
        base = base[:1] + base[3:]
    result = loftune(*base, *args, cache=str(tmp_path / "cache"))
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_cache_names_cannot_escape_the_root(tmp_path):
    result = loftune("cache", "show", "../../etc", cache=str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
