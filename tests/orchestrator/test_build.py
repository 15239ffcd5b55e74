"""The distributed base builder: real Ray actors, real files, real models."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
import transformers
from conftest import dequantized_state_dict, kill_own_process

from orchestrator.build import BuildInputError, BuildRequest, describe_entry, ensure_base
from orchestrator.cache import BaseCache
from orchestrator.entry import entry_tokenizer_files, error_table, load_entry_tensors
from workers.model_source import ModelSource, materialize_tiny
from workers.quant import QuantSpec
from workers.quant_plan import Override, QuantPlan
from workers.surgery import apply_quantized_base

pytestmark = pytest.mark.usefixtures("ray_session")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> ModelSource:
    return materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))


def request_for(source, kind="nf", bits=2, group=64, **kw) -> BuildRequest:
    return BuildRequest(source, QuantPlan(QuantSpec(kind, bits, group)), **kw)


def file_hashes(manifest: dict) -> dict[str, str]:
    return {path.rsplit("/", 1)[-1]: meta["sha256"] for path, meta in manifest["files"].items()}


def test_build_then_hit(tmp_path, tiny_llama):
    cache = BaseCache(str(tmp_path / "cache"))
    req = request_for(tiny_llama, rank=8, iters=2)
    first = ensure_base(req, cache, actors=2, progress=False)
    assert first.built and first.name == req.key().name
    linear = [m for m in tiny_llama.linear_modules if "lm_head" not in m]
    assert sorted(first.manifest["targets"]) == sorted(linear) and len(linear) == 14
    for rec in first.manifest["matrices"].values():
        assert min(rec["errors"]) < rec["quant_error"]
    second = ensure_base(req, cache, actors=2, progress=False)
    assert not second.built and second.manifest == first.manifest
    assert "self_attn.*" not in error_table(first.manifest) and "q_proj" in error_table(first.manifest)


def test_quantized_model_matches_dequantized_fp_forward(tmp_path, minilm_dir):
    source = ModelSource(minilm_dir, name="minilm-l6")
    cache = BaseCache(str(tmp_path / "cache"))
    result = ensure_base(request_for(source, bits=4, rank=8, iters=1), cache, progress=False)
    tensors = load_entry_tensors(cache, result.name, rank=8)
    assert "tokenizer.json" in entry_tokenizer_files(cache, result.name)  # the entry carries its tokenizer
    config = transformers.AutoConfig.from_pretrained(minilm_dir)
    quantized = transformers.BertModel(config).eval()
    targets = apply_quantized_base(quantized, tensors, rank=8, alpha=16)
    assert len(targets) == 36
    # reference: plain BertModel whose weights are dequant(Q) + s * B @ A, computed outside our layer
    reference = transformers.BertModel(config).eval()
    state = dequantized_state_dict(tensors)
    for module in targets:
        state[f"{module}.weight"] += tensors[f"{module}.lora_B"] @ tensors[f"{module}.lora_A"]
    loaded = reference.load_state_dict({k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))},
                                       strict=False)
    assert loaded.missing_keys == [] and loaded.unexpected_keys == ["embeddings.position_ids"]
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = quantized(ids).last_hidden_state, reference(ids).last_hidden_state
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    # and the packed layer really keeps packed codes: 4 bits per weight, not a float matrix
    layer = quantized.get_submodule(targets[0])
    assert layer.qcodes.dtype == torch.uint8 and layer.qcodes.numel() == layer.in_features * layer.out_features // 2


def test_killed_actor_gives_an_identical_entry(tmp_path, tiny_llama):
    req = request_for(tiny_llama, bits=4, rank=8, iters=3)
    clean = ensure_base(req, BaseCache(str(tmp_path / "clean")), actors=2, progress=False)
    killed = []

    def kill_one_actor(done: int, total: int) -> None:
        if done == 2 and not killed:
            if (pid := kill_own_process("MatrixWorker")) is not None:
                killed.append(pid)

    faulted = ensure_base(req, BaseCache(str(tmp_path / "faulted")), actors=2, progress=False,
                          on_progress=kill_one_actor)
    assert killed, "no MatrixWorker process was found to kill"
    assert faulted.built and file_hashes(faulted.manifest) == file_hashes(clean.manifest)


def test_rank_independent_base_is_shared_across_ranks(tmp_path, tiny_llama):
    cache = BaseCache(str(tmp_path / "cache"))
    r8 = ensure_base(request_for(tiny_llama, rank=8, iters=1), cache, progress=False)
    r16 = ensure_base(request_for(tiny_llama, rank=16, iters=1), cache, progress=False)
    assert r8.name == r16.name and r16.built
    assert r16.manifest["factor_ranks"] == [8, 16]
    base_files = {k: v for k, v in file_hashes(r8.manifest).items() if not k.startswith("lora-")}
    assert {k: v for k, v in file_hashes(r16.manifest).items() if k in base_files} == base_files
    t16 = load_entry_tensors(cache, r16.name, rank=16)
    assert t16["model.layers.0.self_attn.q_proj.lora_A"].shape == (16, 128)
    assert not ensure_base(request_for(tiny_llama, rank=8, iters=1), cache, progress=False).built
    # with iters > 1 the rank is part of the key
    assert request_for(tiny_llama, rank=8, iters=2).key().name != request_for(tiny_llama, rank=16, iters=2).key().name


def test_bad_group_size_is_reported_before_any_work(tmp_path, tiny_llama):
    cache = BaseCache(str(tmp_path / "cache"))
    with pytest.raises(BuildInputError, match=r"mlp.down_proj: shape \(128, 256\).*group_size=96"):
        ensure_base(request_for(tiny_llama, group=96, iters=1), cache, progress=False)
    assert cache.ls() == []


def test_qalora_needs_int(tmp_path, tiny_llama):
    with pytest.raises(BuildInputError, match="qalora"):
        ensure_base(request_for(tiny_llama, method="qalora", iters=1), BaseCache(str(tmp_path)), progress=False)


def test_mixed_precision_plan(tmp_path, tiny_llama):
    plan = QuantPlan(QuantSpec("nf", 2, 64), first_layers=1, first_bits=4,
                     overrides=(Override("down_proj", group_size=32),))
    result = ensure_base(BuildRequest(tiny_llama, plan, rank=4, iters=1), BaseCache(str(tmp_path)), progress=False)
    quants = {m: rec["quant"] for m, rec in result.manifest["matrices"].items()}
    assert quants["model.layers.0.self_attn.q_proj"] == "nf4-g64"
    assert quants["model.layers.1.self_attn.q_proj"] == "nf2-g64"
    assert quants["model.layers.1.mlp.down_proj"] == "nf2-g32"
    assert quants["model.layers.0.mlp.down_proj"] == "nf4-g32"


def test_concurrent_builders_build_once(tmp_path, tiny_llama):
    cache_dir = str(tmp_path / "cache")
    req = request_for(tiny_llama, rank=4, iters=2)
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_base(req, BaseCache(cache_dir), progress=False)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.built for r in results) == [False, True]
    assert results[0].manifest == results[1].manifest


def test_build_into_s3_then_hit_and_load(s3_server, tiny_llama, tmp_path):
    cache = BaseCache(f"s3://loftune-test/build-{os.getpid()}")
    req = request_for(tiny_llama, kind="int", bits=4, rank=4, iters=2)
    built = ensure_base(req, cache, actors=2, progress=False)
    assert built.built and cache.uri.startswith("s3://") and cache.verify(built.name) == []
    hit = ensure_base(req, BaseCache(cache.uri), actors=2, progress=False)
    assert not hit.built and hit.manifest["build_id"] == built.manifest["build_id"]
    local = ensure_base(req, BaseCache(str(tmp_path / "local")), actors=2, progress=False)
    assert file_hashes(local.manifest) == file_hashes(built.manifest)  # same bytes on either backend
    tensors = load_entry_tensors(cache, built.name, rank=4)
    assert tensors["model.layers.1.mlp.up_proj.lora_A"].shape == (4, 128)
    assert "tokenizer.json" in entry_tokenizer_files(cache, built.name)  # JSON files travel through S3 as well


# ------------------------------------------------------------------------------ checked hits, self-contained


def entry_file(cache: BaseCache, manifest: dict, file: str) -> Path:
    rel = next(p for p in manifest["files"] if p.rsplit("/", 1)[-1] == file)
    return Path(cache.root, "bases", manifest["name"], rel)


def test_describe_entry_says_what_a_run_would_do(tmp_path, tiny_llama):
    cache = BaseCache(str(tmp_path / "cache"))
    r4, r8 = request_for(tiny_llama, rank=4, iters=1), request_for(tiny_llama, rank=8, iters=1)
    assert describe_entry(r4, cache) == "to build"
    manifest = ensure_base(r4, cache, progress=False).manifest
    assert describe_entry(r4, cache) == "cached"
    assert describe_entry(r8, cache) == "factors for rank 8 to add"
    entry_file(cache, manifest, "rest.safetensors").write_bytes(b"short")
    status = describe_entry(r4, cache)
    assert status.startswith(f"broken ({manifest['name']}/{manifest['build_id']}/rest.safetensors: truncated (5 of ")
    assert status.endswith("): will be rebuilt")


@pytest.mark.parametrize("damage", ["truncate", "manifest"])
def test_broken_hit_is_rebuilt_identically(tmp_path, tiny_llama, damage):
    cache = BaseCache(str(tmp_path / "cache"))
    req = request_for(tiny_llama, rank=4, iters=1)
    first = ensure_base(req, cache, progress=False)
    if damage == "truncate":
        shard = entry_file(cache, first.manifest, "base-00000.safetensors")
        shard.write_bytes(shard.read_bytes()[:1000])
        expected = "base-00000.safetensors: truncated (1000 of"
    else:
        Path(cache.root, "bases", first.name, "manifest.json").write_text('{"name": "other"')
        expected = "manifest.json not valid JSON"
    again = ensure_base(req, cache, progress=False)
    assert again.built and len(again.repaired) == 1 and expected in again.repaired[0]
    assert again.manifest["build_id"] != first.manifest["build_id"]
    assert file_hashes(again.manifest) == file_hashes(first.manifest)  # content-addressed: the same bytes
    assert cache.problems(first.name, hashes=True) == []
    hit = ensure_base(req, cache, progress=False)
    assert not hit.built and hit.repaired == []


def test_wrong_hash_is_caught_only_when_hashes_are_verified(tmp_path, tiny_llama):
    cache = BaseCache(str(tmp_path / "cache"))
    req = request_for(tiny_llama, rank=4, iters=1)
    first = ensure_base(req, cache, progress=False)
    shard = entry_file(cache, first.manifest, "rest.safetensors")
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    assert not ensure_base(req, cache, progress=False).built  # sizes match: a cheap check cannot see it
    repaired = ensure_base(req, cache, progress=False, verify_hashes=True)
    assert repaired.built and "rest.safetensors: sha256 mismatch" in repaired.repaired[0]
    assert file_hashes(repaired.manifest) == file_hashes(first.manifest)


def test_entry_is_self_contained_when_the_cache_moves(tmp_path, minilm_dir):
    source = materialize_tiny("tiny-llama", str(tmp_path / "models"))  # carries the MiniLM tokenizer
    config = Path(source.path, "config.json").read_bytes()
    previous = os.umask(0o002)
    try:
        built = ensure_base(request_for(source, rank=4, iters=1), BaseCache(str(tmp_path / "cache")),
                            progress=False)
    finally:
        os.umask(previous)
    entry = tmp_path / "cache" / "bases" / built.name
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in entry.rglob("*") if p.is_file()}
    assert {"tokenizer.json", "config.json", "manifest.json"} <= set(modes) and set(modes.values()) == {"0o664"}
    shutil.copytree(tmp_path / "cache", tmp_path / "moved")
    shutil.rmtree(tmp_path / "cache")
    os.rename(source.path, str(tmp_path / "gone"))  # the model path recorded in the manifest no longer works
    moved = BaseCache(str(tmp_path / "moved"))
    assert not os.path.exists(moved.show(built.name)["model"]["path"])
    files = entry_tokenizer_files(moved, built.name)
    assert set(files) == {"tokenizer.json", "tokenizer_config.json"}
    assert all(json.loads(data) is not None for data in files.values())  # JSON only
    assert moved.read_bytes(built.name, "config.json") == config
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    copy = transformers.AutoTokenizer.from_pretrained(str(folder))
    original = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    sentence = "The cache moved to another host, and the tokenizer came along: ünïcödé 42!"
    assert copy(sentence)["input_ids"] == original(sentence)["input_ids"]
    assert len(load_entry_tensors(moved, built.name, rank=4, verify=False)) > 0


def test_model_without_a_tokenizer_stores_none(tmp_path):
    source = materialize_tiny("tiny-bert", str(tmp_path / "models"))
    cache = BaseCache(str(tmp_path / "cache"))
    built = ensure_base(request_for(source, kind="int", bits=4, rank=4, iters=1), cache, progress=False)
    assert entry_tokenizer_files(cache, built.name) == {}
    assert [p.rsplit("/", 1)[-1] for p in built.manifest["files"] if p.endswith(".json")] == ["config.json"]

