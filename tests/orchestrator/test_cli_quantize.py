"""`loftune quantize` and `loftune cache` as a user runs them: real processes, real Ray, real files."""

from __future__ import annotations

import json
import os

import pytest
from conftest import loftune

from orchestrator.cli import build_parser
from orchestrator.cli_bases import _quantization
from orchestrator.spec import Mixed, Quantization


def quantization_of(*flags: str) -> Quantization:
    return _quantization(build_parser().parse_args(["quantize", "--model", "tiny-llama", *flags]))


def test_quantize_flags_are_the_spec_fields_with_the_spec_defaults():
    """`loftune quantize` builds what a spec's `quantization:` section builds: a flag left out is its default."""
    assert quantization_of() == Quantization()  # iters 5, as in a spec (it once defaulted to 1 here)
    given = quantization_of("--kind", "int", "--bits", "3", "--group-size", "32", "--scale-dtype", "bfloat16",
                            "--method", "qalora", "--rank", "4", "--iters", "2", "--targets", "q_proj,v_proj",
                            "--mixed-first-layers", "2", "--mixed-bits", "8")
    assert given == Quantization(kind="int", bits=3, group_size=32, scale_dtype="bfloat16", method="qalora", rank=4,
                                 iters=2, targets=["q_proj", "v_proj"], mixed=Mixed(first_layers=2, bits=8))


def test_quantize_keeps_its_earlier_flags_as_aliases():
    """Scripts use the earlier names: --quant is --kind, --first-layers / --first-bits are the mixed fields."""
    assert quantization_of("--quant", "int", "--first-layers", "2", "--first-bits", "4") == \
        Quantization(kind="int", mixed=Mixed(first_layers=2, bits=4))
    assert quantization_of("--first-bits", "2").mixed == Mixed(bits=2)  # first_layers: the spec's default


@pytest.mark.slow
def test_quantize_build_hit_and_cache_commands(tmp_path):
    cache = str(tmp_path / "cache")
    args = ["quantize", "--model", "tiny-llama", "--kind", "nf", "--bits", "2", "--group-size", "64",
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


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,needle",
    [
        (["--quant", "nf", "--bits", "8"], "QuantSpec.bits"),
        (["--quant", "nf", "--bits", "2", "--first-bits", "8"], "QuantPlan.first_bits: nf supports [2, 3, 4], got 8"),
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


@pytest.mark.slow
def test_cache_names_cannot_escape_the_root(tmp_path):
    result = loftune("cache", "show", "../../etc", cache=str(tmp_path / "cache"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
