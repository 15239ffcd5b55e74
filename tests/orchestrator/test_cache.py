"""The cache of quantized bases, on a real directory and on a real local S3 server (moto_server on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
from conftest import REPO

from orchestrator.cache import (
    FORMAT_VERSION,
    BaseCache,
    BaseCacheKey,
    CacheCorruptError,
    CacheError,
    CacheLockTimeoutError,
    CacheMissError,
)

BUCKET = "loftune-test"
KEY_FIELDS = dict(model="minilm-l6", fingerprint="ab" * 32,
                  quant={"kind": "nf", "bits": 2, "group_size": 64, "scale_dtype": "float16", "overrides": {}},
                  quant_label="nf2-g64", method="loftq", iters=5, rank=16, targets=("key", "query", "value"))


def make_key(**changes) -> BaseCacheKey:
    return BaseCacheKey(**{**KEY_FIELDS, **changes})


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "codes": torch.randint(0, 256, (64, 32), dtype=torch.uint8, generator=g),
        "scales": torch.randn(64, 4, generator=g).to(torch.float16),
        "lora_A": torch.randn(8, 32, generator=g).to(torch.bfloat16),
        "bias": torch.randn(64, generator=g),
        "index": torch.arange(10, dtype=torch.int64),
    }


def build(cache: BaseCache, key: BaseCacheKey, extra: dict | None = None) -> dict:
    """A two-file entry: the uint8 codes and fp16 scales in one shard, the rest in another."""
    t = sample_tensors()
    with cache.writer(key) as writer:
        writer.add_file("base-00000.safetensors", {"codes": t["codes"], "scales": t["scales"]}, {"shard": "0"})
        writer.add_file("rest.safetensors", {k: t[k] for k in ("lora_A", "bias", "index")})
        return writer.commit(extra or {"build_seconds": 1.5})


def entry_path(cache: BaseCache, name: str, rel: str = "") -> str:
    """The raw path of an entry (or a file of it) on the store's fsspec filesystem, `cache.store.fs`: the tests
    tamper with files behind the cache's back."""
    return f"{cache.root}/bases/{name}" + (f"/{rel}" if rel else "")


# ------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(params=["local", "s3"])
def cache(request, tmp_path) -> BaseCache:
    if request.param == "local":
        return BaseCache(str(tmp_path / "cache"))
    request.getfixturevalue("s3_server")
    return BaseCache(f"s3://{BUCKET}/{uuid.uuid4().hex[:10]}")


# ------------------------------------------------------------------------------------------------ key


def test_key_is_stable_across_constructions_and_orderings():
    a = make_key()
    b = make_key(quant=dict(reversed(list(KEY_FIELDS["quant"].items()))), targets=("value", "query", "key"))
    assert a == b and hash(a) == hash(b)
    assert a.digest == b.digest and a.name == b.name
    canonical = json.dumps(a.fields(), sort_keys=True, separators=(",", ":"))
    assert a.digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert a.fields()["format_version"] == FORMAT_VERSION


Q = KEY_FIELDS["quant"]
CHANGES = {
    "model": {"model": "minilm-l12"}, "fingerprint": {"fingerprint": "cd" * 32}, "quant_label": {"quant_label": "x"},
    "quant.kind": {"quant": {**Q, "kind": "int"}}, "quant.bits": {"quant": {**Q, "bits": 4}},
    "quant.group_size": {"quant": {**Q, "group_size": 128}},
    "quant.scale_dtype": {"quant": {**Q, "scale_dtype": "bfloat16"}},
    "quant.overrides": {"quant": {**Q, "overrides": {"layer.0": {"bits": 4}}}},
    "method": {"method": "qalora"}, "iters": {"iters": 4}, "rank": {"rank": 64}, "targets": {"targets": ("key",)},
    "format_version": {"format_version": 2},
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_key_changes_with_every_field(change):
    base, changed = make_key(), make_key(**change)
    assert changed != base
    assert changed.digest != base.digest
    assert changed.name != base.name


def test_key_ignores_rank_when_iters_at_most_one():
    for iters in (0, 1):
        keys = [make_key(iters=iters, rank=r) for r in (16, 64, None)]
        assert all(k.rank is None for k in keys)
        assert len({k.digest for k in keys}) == 1 and len({k.name for k in keys}) == 1
        assert keys[0] == keys[1]
    assert make_key(iters=2, rank=16).digest != make_key(iters=2, rank=64).digest


def test_key_readable_name():
    digest = make_key().digest
    assert make_key().name == f"minilm-l6__nf2-g64__loftq-t5-r16__{digest[:12]}"
    assert make_key(method="qlora", iters=0).name.split("__")[2] == "qlora-t0"
    assert make_key(iters=1).name.split("__")[2] == "loftq-t1"
    odd = make_key(model="Meta/Llama 2..7B_hf", quant_label="Mixed NF4x2/NF2")
    assert odd.name.startswith("meta-llama-2.7b-hf__mixed-nf4x2-nf2__loftq-t5-r16__")


@pytest.mark.parametrize("change, field", [
    ({"method": "gptq"}, "method"), ({"iters": -1}, "iters"), ({"iters": "5"}, "iters"), ({"rank": None}, "rank"),
    ({"rank": -2}, "rank"), ({"targets": "query"}, "targets"), ({"targets": ()}, "targets"),
    ({"quant": {"kind": object()}}, "quant"), ({"fingerprint": ""}, "fingerprint"),
])
def test_key_rejects_bad_fields(change, field):
    with pytest.raises(ValueError, match=field):
        make_key(**change)


# ------------------------------------------------------------------------------------- write and read


def test_miss_then_build_then_hit(cache):
    key = make_key()
    assert cache.lookup(key) is None and cache.ls() == []
    with pytest.raises(CacheMissError, match=key.name):
        cache.show(key.name)
    manifest = build(cache, key)
    assert cache.lookup(key) == manifest == cache.show(key.name)
    assert manifest["name"] == key.name and manifest["key"] == key.fields() and manifest["build_id"]
    assert manifest["build_seconds"] == 1.5 and manifest["created"]
    assert sorted(manifest["files"]) == [f"{manifest['build_id']}/base-00000.safetensors",
                                         f"{manifest['build_id']}/rest.safetensors"]
    for rel, record in manifest["files"].items():
        data = cache.store.fs.cat_file(entry_path(cache, key.name, rel))
        assert record == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    tensors = cache.read_all(key.name)
    for name, expected in sample_tensors().items():
        assert tensors[name].dtype == expected.dtype and torch.equal(tensors[name], expected), name
    assert set(cache.read_file(key.name, "base-00000.safetensors")) == {"codes", "scales"}
    [summary] = cache.ls()
    assert summary["name"] == key.name and summary["key"] == key.fields()
    assert summary["status"] == "ok" and summary["problem"] is None
    assert summary["bytes"] == sum(r["bytes"] for r in manifest["files"].values())
    assert cache.verify() == [] and cache.verify(key.name) == []
    assert cache.gc(grace_seconds=0) == []


def test_failed_write_leaves_no_entry(cache):
    key = make_key()
    with pytest.raises(RuntimeError, match="boom"), cache.writer(key) as writer:
        writer.add_file("base-00000.safetensors", sample_tensors())
        raise RuntimeError("boom")
    assert not cache.store.fs.exists(entry_path(cache, key.name, writer.build_id))
    assert cache.lookup(key) is None and cache.ls() == []
    cache.gc(grace_seconds=0)
    assert not cache.store.fs.exists(entry_path(cache, key.name))


def test_uncommitted_build_is_collected_after_the_grace_period(cache):
    key = make_key()
    writer = cache.writer(key)  # never committed, never aborted: what a crash leaves
    writer.add_file("base-00000.safetensors", sample_tensors())
    assert cache.lookup(key) is None and cache.verify() == []
    assert cache.gc() == []  # younger than the default hour: it may be a build in progress
    assert cache.gc(grace_seconds=0) == [f"{key.name}/"]
    assert not cache.store.fs.exists(entry_path(cache, key.name))


def test_gc_removes_builds_the_manifest_does_not_reference(cache):
    key = make_key()
    lost = cache.writer(key)
    lost.add_file("base-00000.safetensors", sample_tensors())
    manifest = build(cache, key)
    # what a crashed add_files and a crashed manifest write leave behind
    stray = f"{manifest['build_id']}/lora-r8.safetensors"
    cache.store.fs.pipe_file(entry_path(cache, key.name, stray), b"partial")
    cache.store.fs.pipe_file(entry_path(cache, key.name, ".tmp-0123-manifest.json"), b"{")
    assert cache.gc() == []  # younger than the default hour: they may still be being written
    assert sorted(cache.gc(grace_seconds=0)) == sorted([f"{key.name}/{lost.build_id}", f"{key.name}/{stray}",
                                                        f"{key.name}/.tmp-0123-manifest.json"])
    assert not cache.store.fs.exists(entry_path(cache, key.name, lost.build_id))
    assert not cache.store.fs.exists(entry_path(cache, key.name, stray))
    assert cache.lookup(key) == manifest and cache.verify() == []


def test_losing_a_race_keeps_the_first_entry(cache):
    key = make_key()
    first, second = cache.writer(key), cache.writer(key)
    first.add_file("rest.safetensors", {"w": torch.zeros(3)})
    second.add_file("rest.safetensors", {"w": torch.ones(3)})
    published = first.commit({"who": "first"})
    assert second.commit({"who": "second"}) == published
    assert not cache.store.fs.exists(entry_path(cache, key.name, second.build_id))
    assert torch.equal(cache.read_all(key.name)["w"], torch.zeros(3))


CHILD = r"""
import json, os, sys, time
import torch
from orchestrator.cache import BaseCache, BaseCacheKey
mode, uri, key_json, out = sys.argv[1:5]
cache, key = BaseCache(uri), BaseCacheKey(**json.loads(key_json))
print("ready", flush=True)
if mode == "crash":
    writer = cache.writer(key)
    writer.add_file("base-00000.safetensors", {"w": torch.arange(1000)})
    print("written", flush=True)
    time.sleep(60)
while not os.path.exists(os.path.join(out, "go")):
    time.sleep(0.01)
with cache.lock(key, timeout=60):
    if cache.lookup(key) is None:
        open(os.path.join(out, f"built-{os.getpid()}"), "w").close()
        time.sleep(0.5)
        with cache.writer(key) as writer:
            writer.add_file("base-00000.safetensors", {"w": torch.arange(1000)})
            writer.commit({"builder": os.getpid()})
print(json.dumps({"pid": os.getpid(), "build_id": cache.lookup(key)["build_id"]}), flush=True)
"""


def spawn_child(mode: str, cache: BaseCache, key: BaseCacheKey, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", CHILD, mode, cache.uri, json.dumps(key.fields()), str(out)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)


def test_killed_builder_leaves_no_entry(cache, tmp_path):
    key = make_key()
    child = spawn_child("crash", cache, key, tmp_path)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.stdout.readline().strip() == "written"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert cache.lookup(key) is None and cache.ls() == [] and cache.verify() == []
    assert cache.gc(grace_seconds=0) == [f"{key.name}/"]
    build(cache, key)
    assert cache.verify() == []


def test_two_builder_processes_build_once(tmp_path):
    cache, key = BaseCache(str(tmp_path / "cache")), make_key()
    children = [spawn_child("build", cache, key, tmp_path) for _ in range(2)]
    try:
        for child in children:
            assert child.stdout.readline().strip() == "ready"
        (tmp_path / "go").touch()
        results = [json.loads(child.communicate(timeout=60)[0]) for child in children]
    finally:
        for child in children:
            child.kill()
    assert [child.returncode for child in children] == [0, 0]
    builds = list(tmp_path.glob("built-*"))
    assert len(builds) == 1
    manifest = cache.lookup(key)
    assert f"built-{manifest['builder']}" == builds[0].name
    assert {r["build_id"] for r in results} == {manifest["build_id"]}
    assert len(os.listdir(entry_path(cache, key.name))) == 2  # the manifest and one build folder


def test_two_builder_threads_build_once(cache):
    key, builds, errors = make_key(), [], []

    def builder() -> None:
        try:
            with cache.lock(key, timeout=30):
                if cache.lookup(key) is None:
                    builds.append(threading.get_ident())
                    time.sleep(0.3)
                    build(cache, key)
        except Exception as exc:  # reported below: an exception in a thread would be lost
            errors.append(exc)

    threads = [threading.Thread(target=builder) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(builds) == 1
    assert cache.verify() == []


def test_lock_times_out_while_held_and_is_reentrant(cache):
    key, held, release = make_key(), threading.Event(), threading.Event()

    def holder() -> None:
        with cache.lock(key):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        held.wait(10)
        with pytest.raises(CacheLockTimeoutError, match=key.name):
            with cache.lock(key, timeout=0.2):
                pass
        assert cache.gc(grace_seconds=0) == []  # a locked entry is being built: gc leaves it alone
    finally:
        release.set()
        thread.join()
    with cache.lock(key.name), cache.lock(key, timeout=0):
        pass


# ---------------------------------------------------------------------------------------- corruption


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_file_is_detected_then_rebuilt(cache, damage):
    key = make_key()
    manifest = build(cache, key)
    rel = f"{manifest['build_id']}/base-00000.safetensors"
    path = entry_path(cache, key.name, rel)
    data = bytearray(cache.store.fs.cat_file(path))
    if damage == "flip":
        data[-1] ^= 0xFF
    else:
        del data[len(data) // 2:]
    cache.store.fs.pipe_file(path, bytes(data))  # on S3: the object is overwritten

    with pytest.raises(CacheCorruptError, match=f"{key.name}.*base-00000.safetensors") as info:
        cache.read_file(key.name, rel)
    assert ("sha256 mismatch" if damage == "flip" else "truncated") in str(info.value)
    with pytest.raises(CacheCorruptError, match="base-00000.safetensors"):
        cache.read_all(key.name)
    if damage == "truncate":  # without the hash check, safetensors itself refuses the file
        with pytest.raises(CacheCorruptError, match="base-00000.safetensors"):
            cache.read_file(key.name, rel, verify=False)
    [problem] = cache.verify()
    assert problem.startswith(f"{key.name}/{rel}: ")
    assert cache.verify(key.name) == [problem]
    assert set(cache.read_file(key.name, "rest.safetensors")) == {"lora_A", "bias", "index"}

    cache.rm(key.name)
    assert cache.lookup(key) is None and cache.verify() == []
    with pytest.raises(CacheMissError):
        cache.rm(key.name)
    build(cache, key)
    assert cache.verify() == []
    assert torch.equal(cache.read_all(key.name)["codes"], sample_tensors()["codes"])


def test_missing_file_is_reported(cache):
    key = make_key()
    manifest = build(cache, key)
    rel = f"{manifest['build_id']}/rest.safetensors"
    cache.store.fs.rm(entry_path(cache, key.name, rel))
    assert cache.verify() == [f"{key.name}/{rel}: missing"]
    with pytest.raises(CacheCorruptError, match="rest.safetensors: missing"):
        cache.read_file(key.name, rel)


def test_manifest_that_is_not_json_is_corrupt(cache):
    key = make_key()
    build(cache, key)
    path = entry_path(cache, key.name, "manifest.json")
    cache.store.fs.pipe_file(path, b'{"format_version": 1, "na')
    with pytest.raises(CacheCorruptError, match="manifest.json not valid JSON"):
        cache.lookup(key)
    [listed] = cache.ls()  # listed as broken, not hidden
    assert (listed["name"], listed["status"], listed["bytes"]) == (key.name, "broken", None)
    assert "manifest.json not valid JSON" in listed["problem"]
    assert len(cache.verify()) == 1 and "manifest.json" in cache.verify()[0]
    assert cache.gc(grace_seconds=0) == []  # never delete what cannot be read


# ------------------------------------------------------------------------------------------- add_files


def test_add_files_merges_into_the_manifest(cache):
    key = make_key(iters=1)
    first = build(cache, key, {"factor_ranks": [16], "matrices": {"q": {"quant_error": 0.5}}})
    factors = {"q.lora_A": torch.randn(64, 32).to(torch.bfloat16), "q.lora_B": torch.randn(32, 64)}
    with cache.lock(key):  # the builder holds the key's lock around add_files: the lock is reentrant
        updated = cache.add_files(key.name, {"lora-r64.safetensors": factors},
                                  {"factor_ranks": [16, 64], "matrices": {"q": {"r64_error": 0.25}}})
    assert cache.lookup(key) == updated
    assert updated["build_id"] == first["build_id"]
    assert set(updated["files"]) == set(first["files"]) | {f"{first['build_id']}/lora-r64.safetensors"}
    assert updated["factor_ranks"] == [16, 64]
    assert updated["matrices"] == {"q": {"quant_error": 0.5, "r64_error": 0.25}}
    read = cache.read_file(key.name, "lora-r64.safetensors")
    assert all(torch.equal(read[k], v) for k, v in factors.items())
    assert torch.equal(cache.read_file(key.name, "rest.safetensors")["index"], torch.arange(10))
    assert cache.verify() == [] and cache.gc(grace_seconds=0) == []
    with pytest.raises(ValueError, match="write-once"):
        cache.add_files(key.name, {"lora-r64.safetensors": factors}, {})
    with pytest.raises(ValueError, match="files"):
        cache.add_files(key.name, {"lora-r8.safetensors": factors}, {"files": {}})
    with pytest.raises(CacheMissError):
        cache.add_files(make_key(iters=3).name, {"lora-r8.safetensors": factors}, {})


# ----------------------------------------------------------------------------------------- name safety

BAD_NAMES = ["../x", "a/b", "/etc/passwd", "..", "", ".hidden", "a\nb", "a..b", "x" * 300]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_unsafe_entry_names_are_rejected(bad, tmp_path):
    cache = BaseCache(str(tmp_path / "cache"))
    calls = [cache.show, cache.rm, cache.lookup, cache.verify, cache.read_all,
             lambda n: cache.read_file(n, "rest.safetensors"), lambda n: cache.add_files(n, {}, {}),
             lambda n: cache.lock(n).__enter__()]
    for call in calls:
        with pytest.raises(ValueError, match="cannot escape the cache root"):
            call(bad)


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "..", "", "b/../../x", "b//x"])
def test_unsafe_file_names_are_rejected(bad, tmp_path):
    cache, key = BaseCache(str(tmp_path / "cache")), make_key()
    build(cache, key)
    with pytest.raises(ValueError, match="cannot escape the cache root"):
        cache.read_file(key.name, bad)
    with cache.writer(key) as writer, pytest.raises(ValueError, match="cannot escape the cache root"):
        writer.add_file(bad, {"w": torch.zeros(1)})


@pytest.mark.parametrize("field, value", [("files", "../../evil"), ("files", "/etc/passwd"), ("build_id", "..")])
def test_manifest_with_escaping_paths_is_rejected(cache, field, value):
    key = make_key()
    manifest = build(cache, key)
    evil = {"sha256": "0" * 64, "bytes": 1}
    if field == "files":
        manifest["files"][value] = evil
    else:
        manifest["build_id"] = value
    cache.store.fs.pipe_file(entry_path(cache, key.name, "manifest.json"), json.dumps(manifest).encode())
    for call in (cache.lookup, cache.show, cache.read_all, lambda n: cache.read_file(n, "rest.safetensors")):
        with pytest.raises(CacheCorruptError, match="cannot escape the cache root"):
            call(key.name)
    assert [(e["status"], "cannot escape the cache root" in e["problem"]) for e in cache.ls()] == [("broken", True)]
    [problem] = cache.verify()
    assert "cannot escape the cache root" in problem
    assert cache.gc(grace_seconds=0) == []


def test_writer_rejects_reserved_extra_and_reuse(tmp_path):
    cache, key = BaseCache(str(tmp_path / "cache")), make_key()
    with cache.writer(key) as writer:
        writer.add_file("rest.safetensors", {"w": torch.zeros(1)})
        with pytest.raises(ValueError, match="already added"):
            writer.add_file("rest.safetensors", {"w": torch.zeros(1)})
        with pytest.raises(ValueError, match="key"):
            writer.commit({"key": "mine"})
        with pytest.raises(ValueError, match="safetensors"):
            writer.add_file("weights.bin", {"w": torch.zeros(1)})
        writer.commit({})
    with pytest.raises(CacheError, match="committed"):
        writer.add_file("more.safetensors", {"w": torch.zeros(1)})
    assert cache.verify() == []


# ------------------------------------------------------------------------------------------------ uri


def test_uri_resolution_order(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("LOFTUNE_CACHE", raising=False)
    assert BaseCache().uri == str(tmp_path / "home" / ".cache" / "loftune")
    monkeypatch.setenv("LOFTUNE_CACHE", str(tmp_path / "from-env"))
    assert BaseCache().uri == str(tmp_path / "from-env")
    assert BaseCache(str(tmp_path / "explicit")).uri == str(tmp_path / "explicit")
    assert BaseCache(f"file://{tmp_path}/explicit/").uri == str(tmp_path / "explicit")
    monkeypatch.chdir(tmp_path)
    assert BaseCache("relative").root == str(tmp_path / "relative")


def test_s3_uri_is_normalized_and_keeps_credentials_out(monkeypatch):
    monkeypatch.setenv("LOFTUNE_CACHE", "s3://bucket/some/prefix/")
    cache = BaseCache()
    assert (cache.uri, cache.root, cache.is_local) == ("s3://bucket/some/prefix", "bucket/some/prefix", False)
    with pytest.raises(ValueError, match="credentials") as info:
        BaseCache("s3://AKIA:hunter2@bucket/prefix")
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize("uri", ["gs://bucket/prefix", "http://host/cache", "hdfs://nn/cache"])
def test_unsupported_scheme_is_rejected(uri):
    scheme = uri.split(":")[0]
    with pytest.raises(ValueError, match=f"{uri}.*'{scheme}'.*s3://"):
        BaseCache(uri)
