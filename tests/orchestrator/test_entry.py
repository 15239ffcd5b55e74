"""orchestrator/entry.py: a cache entry built by the real build path (Ray actors, tiny-llama), read back.

Its file names (fixed: existing caches must still load), which factor ranks it holds, its adapter kind, its error
table, and `read_model_inputs`, the one way from an entry to what a model is built from.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from orchestrator.build import BuildRequest, ensure_base
from orchestrator.cache import BaseCache, CacheCorruptError
from orchestrator.entry import (
    CONFIG_FILE,
    REST_FILE,
    TOKENIZER_DIR,
    adapter_kind,
    base_shard_file,
    error_table,
    factor_file,
    factor_ranks,
    load_entry_tensors,
    read_model_inputs,
)
from workers.entry_format import factor_names, quantized_modules, qweight_names
from workers.model_source import materialize_tiny
from workers.qlayers import QuantLoraLinear
from workers.quant import QuantSpec
from workers.quant_plan import QuantPlan
from workers.train_loop import build_model
from workers.train_settings import AdapterSettings

pytestmark = pytest.mark.usefixtures("ray_session")
Q_PROJ = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-llama's entries in one cache: LoftQ NF4 (factors for ranks 4 and 8), QA-LoRA INT4 and the bf16 control."""
    root = tmp_path_factory.mktemp("entry")
    source = materialize_tiny("tiny-llama", str(root / "models"))
    cache = BaseCache(str(root / "cache"))
    nf4 = QuantPlan(QuantSpec("nf", 4, 64))
    int4 = QuantPlan(QuantSpec("int", 4, 32, "float32"))
    loftq = ensure_base(BuildRequest(source, nf4, rank=4, iters=1), cache, progress=False)
    assert ensure_base(BuildRequest(source, nf4, rank=8, iters=1), cache, progress=False).name == loftq.name
    qalora = ensure_base(BuildRequest(source, int4, method="qalora", rank=4, iters=1), cache, progress=False)
    control = ensure_base(BuildRequest.full_precision(source, rank=4), cache, progress=False)
    return {"root": root, "source": source, "cache": cache, "loftq": loftq.name, "qalora": qalora.name,
            "control": control.name}


def files_of(manifest: dict) -> set[str]:
    return {path.split("/", 1)[1] for path in manifest["files"]}


def test_entry_file_names_stay_those_of_existing_caches():
    assert (REST_FILE, CONFIG_FILE, TOKENIZER_DIR) == ("rest.safetensors", "config.json", "tokenizer")
    assert factor_file(16) == "lora-r16.safetensors" and base_shard_file(3) == "base-00003.safetensors"


def test_the_build_writes_the_named_files_with_the_named_tensors(built):
    cache, source, name = built["cache"], built["source"], built["loftq"]
    manifest = cache.show(name)
    assert files_of(manifest) == {base_shard_file(0), REST_FILE, factor_file(4), factor_file(8), CONFIG_FILE,
                                  f"{TOKENIZER_DIR}/tokenizer.json", f"{TOKENIZER_DIR}/tokenizer_config.json"}
    targets = manifest["targets"]
    assert len(targets) == 14 and not any("lm_head" in t for t in targets)
    base = set(cache.read_file(name, base_shard_file(0)))
    assert quantized_modules(base) == targets
    assert base == {n for t in targets for n in qweight_names(t) if not n.endswith(".zeros")}  # NF: no zero points
    assert set(cache.read_file(name, factor_file(8))) == {n for t in targets for n in factor_names(t)}
    assert set(cache.read_file(name, REST_FILE)) == set(source.tensors) - {t + ".weight" for t in targets}
    assert json.loads(cache.read_bytes(name, CONFIG_FILE)) == source.config


def test_factor_ranks_and_the_tensors_read_for_a_rank(built):
    cache = built["cache"]
    assert factor_ranks(cache.show(built["loftq"])) == [4, 8]
    assert factor_ranks(cache.show(built["qalora"])) == [4]
    assert factor_ranks(cache.show(built["control"])) == [] and factor_ranks({}) == []
    a_name, b_name = factor_names(Q_PROJ)
    for rank in (4, 8):
        tensors = load_entry_tensors(cache, built["loftq"], rank=rank)
        assert tensors[a_name].shape == (rank, 128) and tensors[b_name].shape == (128, rank)
    assert not any(n in load_entry_tensors(cache, built["loftq"]) for n in (a_name, b_name))
    qalora = load_entry_tensors(cache, built["qalora"], rank=4)
    assert qalora[a_name].shape == (4, 128 // 32)  # QA-LoRA's A acts on the pooled groups
    assert set(qweight_names(Q_PROJ)) <= set(qalora)  # INT: zero points too


def test_adapter_kind_follows_the_method(built):
    cache = built["cache"]
    assert adapter_kind(cache.show(built["loftq"])) == "lora"
    assert adapter_kind(cache.show(built["qalora"])) == "qalora"
    assert adapter_kind(cache.show(built["control"])) == "lora"  # plain LoRA over bf16
    assert adapter_kind({}) == "lora"  # a manifest that records no method


def test_model_inputs_are_the_entry_for_one_adapter(built):
    cache, source = built["cache"], built["source"]
    inputs = read_model_inputs(cache, built["loftq"], rank=8, init="loftq")
    expected = load_entry_tensors(cache, built["loftq"], rank=8)
    assert set(inputs.tensors) == set(expected)
    assert all(torch.equal(inputs.tensors[k], expected[k]) for k in expected)
    assert inputs.model_config == source.config and inputs.model_path == source.path
    assert inputs.tokenizer_files == source.tokenizer_files() and inputs.adapter_kind == "lora"
    for rank, init in ((8, "qlora"), (0, "loftq")):  # no factors for a QLoRA-style start, nor without a rank
        started = read_model_inputs(cache, built["loftq"], rank=rank, init=init)
        assert set(started.tensors) == {k for k in expected if not k.endswith((".lora_A", ".lora_B"))}


def test_a_model_built_from_the_inputs_holds_the_entry(built):
    cache = built["cache"]
    inputs = read_model_inputs(cache, built["qalora"], rank=4, init="loftq")
    adapter = AdapterSettings(rank=4, alpha=8, init="loftq")
    model = build_model(inputs.model_config, inputs.tensors, adapter, inputs.adapter_kind, None).eval()
    layer = model.get_submodule(Q_PROJ)
    assert isinstance(layer, QuantLoraLinear) and layer.adapter == "qalora"
    assert torch.equal(layer.qcodes, inputs.tensors[Q_PROJ + ".qweight.codes"])
    assert torch.equal(layer.lora_A.detach(), inputs.tensors[Q_PROJ + ".lora_A"] / math.sqrt(adapter.scale))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 5, 9, 42]])).logits).all()


def test_model_inputs_without_hashes_still_check_sizes(built, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(built["root"] / "cache", copy)
    cache = BaseCache(str(copy))
    name = built["loftq"]
    rest = os.path.join(str(copy), "bases", name, cache.show(name)["build_id"], REST_FILE)
    with open(rest, "r+b") as f:
        f.truncate(os.path.getsize(rest) - 1)
    with pytest.raises(CacheCorruptError, match="rest.safetensors"):
        read_model_inputs(cache, name, rank=4, verify=False)


def test_error_table_has_a_row_per_layer_type(built):
    cache = built["cache"]
    rows = error_table(cache.show(built["loftq"])).splitlines()
    assert rows[0].split() == ["layer", "n", "quant", "qlora_err", "final_err", "ratio"] and len(rows) == 8
    assert all(row.split()[1] == "2" and row.split()[2] == "nf4-g64" for row in rows[1:])  # two layers of each
    assert any(row.startswith("model.layers.*.mlp.down_proj ") for row in rows)
    control = error_table(cache.show(built["control"])).splitlines()
    assert all(row.split()[-1] == "-" for row in control[1:])  # error 0: nothing to reduce


def test_reading_an_entry_needs_no_ray():
    code = "import sys, orchestrator.entry; print(sorted(m for m in ('ray', 'orchestrator.build') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
