"""The cache under a hostile or careless user (issue 12): broken and foreign entries, read-only and full disks,
shared-cache permissions, self-contained entries. Real files, real mounts (tmpfs, as root), real processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import loftune

from orchestrator.build import BuildRequest, describe_entry, ensure_base
from orchestrator.cache import (
    BaseCache,
    BaseCacheKey,
    CacheCorruptError,
    CacheError,
    CacheForeignError,
    CacheIOError,
)
from orchestrator.entry import entry_tokenizer_files, load_entry_tensors
from workers.model_source import materialize_tiny
from workers.quant import QuantSpec
from workers.quant_plan import QuantPlan

KEY = dict(model="tiny", fingerprint="ab" * 32, quant={"kind": "nf", "bits": 2}, quant_label="nf2-g64",
           method="loftq", iters=1, rank=None, targets=("all-linear",))
TOKENIZER_JSON = json.dumps({"version": "1.0", "model": {"type": "WordLevel"}}).encode()


def make_key(**changes) -> BaseCacheKey:
    return BaseCacheKey(**{**KEY, **changes})


def build(cache: BaseCache, key: BaseCacheKey, shard_elems: int = 1000) -> dict:
    """A three-file entry: a shard, the rest, and a JSON file under tokenizer/."""
    with cache.writer(key) as writer:
        writer.add_file("base-00000.safetensors", {"codes": torch.arange(shard_elems, dtype=torch.int32)})
        writer.add_file("rest.safetensors", {"bias": torch.ones(8)})
        writer.add_json("tokenizer/tokenizer.json", TOKENIZER_JSON)
        return writer.commit({"factor_ranks": []})


def shard_path(cache: BaseCache, manifest: dict, file: str = "base-00000.safetensors") -> Path:
    return Path(cache.root, "bases", manifest["name"], manifest["build_id"], file)


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() or p.is_symlink())


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single stderr line of a failed command (no traceback)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("loftune ")]
    assert "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


class Mounts:
    """Real tmpfs mounts (skipped where mounting is not permitted), unmounted at teardown."""

    def __init__(self) -> None:
        self.mounted: list[Path] = []

    def tmpfs(self, path: Path, size: str | None = None) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        options = ["-o", f"size={size}"] if size else []
        proc = subprocess.run(["mount", "-t", "tmpfs", *options, "tmpfs", str(path)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        self.mounted.append(path)
        return path

    @staticmethod
    def read_only(path: Path) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True, capture_output=True)


@pytest.fixture
def mounts():
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    m = Mounts()
    yield m
    for path in reversed(m.mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path) -> None:
    """Write into `path` until the filesystem is full (a real ENOSPC, no mock)."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------- broken entries


def test_problems_checks_sizes_cheaply_and_hashes_on_request(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    manifest = build(cache, key)
    path = shard_path(cache, manifest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    path.write_bytes(bytes(data))
    assert cache.problems(key.name, hashes=False) == []
    [problem] = cache.problems(key.name, hashes=True)
    assert problem.startswith(f"{key.name}/{manifest['build_id']}/base-00000.safetensors: sha256 mismatch")
    assert cache.verify(key.name) == [problem]  # verify is problems(hashes=True): one logic
    path.write_bytes(bytes(data[:10]))
    [problem] = cache.problems(key.name, hashes=False)
    assert "base-00000.safetensors: truncated (10 of" in problem
    assert cache.problems(make_key(iters=0).name) == []  # no manifest: the entry does not exist


def test_ls_lists_broken_entries_with_the_reason(tmp_path):
    cache = BaseCache(str(tmp_path / "c"))
    good, bad, unreadable = make_key(), make_key(iters=0), make_key(method="qlora", iters=0)
    build(cache, good)
    shard_path(cache, build(cache, bad)).write_bytes(b"short")
    build(cache, unreadable)
    Path(cache.root, "bases", unreadable.name, "manifest.json").write_text("{not json")
    listed = {e["name"]: e for e in cache.ls()}
    assert listed[good.name]["status"] == "ok" and listed[good.name]["problem"] is None
    assert listed[bad.name]["status"] == "broken" and "base-00000.safetensors: truncated" in listed[bad.name]["problem"]
    assert listed[bad.name]["bytes"] > 0
    assert listed[unreadable.name]["status"] == "broken" and "not valid JSON" in listed[unreadable.name]["problem"]
    assert listed[unreadable.name]["bytes"] is None


def test_load_entry_tensors_checks_sizes_without_hashing(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    manifest = build(cache, key)
    path = shard_path(cache, manifest)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # flips a bit of the last tensor value: a valid file with other bytes
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptError, match="sha256 mismatch"):
        load_entry_tensors(cache, key.name)
    assert set(load_entry_tensors(cache, key.name, verify=False)) == {"codes", "bias"}  # the JSON is skipped
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CacheCorruptError, match=f"{key.name} is broken: .*base-00000.safetensors: truncated"):
        load_entry_tensors(cache, key.name, verify=False)


# ------------------------------------------------------------------------------------------ JSON files


def test_json_files_are_recorded_verified_and_skipped_by_tensor_readers(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    manifest = build(cache, key)
    rel = f"{manifest['build_id']}/tokenizer/tokenizer.json"
    assert manifest["files"][rel]["bytes"] == len(TOKENIZER_JSON)
    assert cache.read_bytes(key.name, rel) == TOKENIZER_JSON == cache.read_bytes(key.name, "tokenizer.json")
    assert entry_tokenizer_files(cache, key.name) == {"tokenizer.json": TOKENIZER_JSON}
    assert set(cache.read_all(key.name)) == {"codes", "bias"}
    with pytest.raises(ValueError, match="not a tensor file"):
        cache.read_file(key.name, rel)
    with pytest.raises(ValueError, match="not a JSON file"):
        cache.read_bytes(key.name, "rest.safetensors")
    factors = {"q.lora_A": torch.ones(2, 2)}  # add_files and gc keep working beside JSON files
    cache.add_files(key.name, {"lora-r2.safetensors": factors}, {"factor_ranks": [2]})
    assert cache.gc(grace_seconds=0) == [] and cache.verify() == []
    Path(cache.root, "bases", key.name, rel).write_bytes(TOKENIZER_JSON.replace(b"1.0", b"2.0"))
    with pytest.raises(CacheCorruptError, match="tokenizer.json: sha256 mismatch"):
        entry_tokenizer_files(cache, key.name)


def test_entries_hold_only_safetensors_and_json(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    with cache.writer(key) as writer:
        with pytest.raises(ValueError, match="not a JSON document"):
            writer.add_json("tokenizer/vocab.json", b"\x80\x04K\x01.")  # a pickle is not JSON
        with pytest.raises(ValueError, match=r"expected a \.json file"):
            writer.add_json("tokenizer/vocab.txt", b"{}")
        with pytest.raises(ValueError, match="cannot escape the cache root"):
            writer.add_json("../evil.json", b"{}")
        with pytest.raises(ValueError, match=r"expected a \.safetensors file"):
            writer.add_file("model.pkl", {"w": torch.zeros(1)})
        writer.add_file("rest.safetensors", {"w": torch.zeros(1)})
        manifest = writer.commit({})
    assert entry_tokenizer_files(cache, key.name) == {}  # an entry without a tokenizer (or from before)
    manifest["files"][f"{manifest['build_id']}/state.pkl"] = {"sha256": "0" * 64, "bytes": 1}
    Path(cache.root, "bases", key.name, "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheCorruptError, match=r"state.pkl.*only \.safetensors and \.json"):
        cache.lookup(key)


# ------------------------------------------------------------------------------------- foreign entries


def test_symlinked_entry_is_foreign_and_rm_removes_only_the_link(tmp_path):
    key = make_key()
    outside = BaseCache(str(tmp_path / "outside"))
    build(outside, key)
    target = Path(outside.root, "bases", key.name)
    before = {p: (target / p).read_bytes() for p in files_under(target)}
    cache = BaseCache(str(tmp_path / "c"))
    build(cache, make_key(iters=0))  # an ordinary entry beside it
    (Path(cache.root) / "bases" / key.name).symlink_to(target, target_is_directory=True)

    for call in (cache.lookup, cache.show, cache.read_all, lambda n: cache.read_file(n, "rest.safetensors"),
                 lambda n: entry_tokenizer_files(cache, n), lambda n: load_entry_tensors(cache, n, verify=False)):
        with pytest.raises(CacheForeignError, match=f"entry {key.name} is foreign: .* is a symbolic link to"):
            call(key.name)
    statuses = {e["name"]: e["status"] for e in cache.ls()}
    assert statuses == {key.name: "foreign", make_key(iters=0).name: "ok"}
    assert [p for p in cache.verify() if "foreign" in p] == cache.verify(key.name) and cache.verify(key.name)
    assert cache.gc(grace_seconds=0) == []
    with pytest.raises(CacheForeignError, match="foreign"), cache.writer(key) as writer:
        writer.add_file("rest.safetensors", {"w": torch.zeros(1)})
    assert cache.rm(key.name) == "link"
    assert not os.path.lexists(Path(cache.root, "bases", key.name))
    assert {p: (target / p).read_bytes() for p in files_under(target)} == before  # the target is untouched


def test_symlinked_file_inside_an_entry_is_foreign(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    manifest = build(cache, key)
    shard = shard_path(cache, manifest)
    copy = tmp_path / "elsewhere.safetensors"
    copy.write_bytes(shard.read_bytes())  # the same bytes: only the link makes it foreign
    shard.unlink()
    shard.symlink_to(copy)
    with pytest.raises(CacheForeignError, match="base-00000.safetensors is a symbolic link"):
        cache.read_all(key.name)
    assert [e["status"] for e in cache.ls()] == ["foreign"]
    cache.rm(key.name)
    assert copy.exists() and not Path(cache.root, "bases", key.name).exists()


def test_gc_never_deletes_through_a_link(tmp_path):
    cache, key = BaseCache(str(tmp_path / "c")), make_key()
    manifest = build(cache, key)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.safetensors").write_bytes(b"keep me")
    old = time.time() - 7200
    os.utime(victim / "precious.safetensors", (old, old))
    build_dir = Path(cache.root, "bases", key.name, manifest["build_id"])
    (build_dir / "sub").symlink_to(victim, target_is_directory=True)  # inside a published build folder
    (Path(cache.root, "bases", key.name) / "stray").symlink_to(victim, target_is_directory=True)
    cache.gc(grace_seconds=0)
    assert (victim / "precious.safetensors").read_bytes() == b"keep me"


# ------------------------------------------------------------------------------------------ permissions


@pytest.mark.parametrize("umask, mode", [(0o002, 0o664), (0o022, 0o644)])
def test_every_file_of_an_entry_follows_the_umask(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        cache, key = BaseCache(str(tmp_path / "c")), make_key()
        build(cache, key)
        cache.add_files(key.name, {"lora-r2.safetensors": {"a": torch.ones(2)}}, {"factor_ranks": [2]})
    finally:
        os.umask(previous)
    entry = Path(cache.root, "bases", key.name)
    files = files_under(entry)
    assert {f.rsplit("/", 1)[-1] for f in files} == {"manifest.json", "base-00000.safetensors", "rest.safetensors",
                                                     "tokenizer.json", "lora-r2.safetensors"}
    assert {f: oct((entry / f).stat().st_mode & 0o777) for f in files} == {f: oct(mode) for f in files}


def test_a_tiny_model_follows_the_umask(tmp_path):
    previous = os.umask(0o002)
    try:
        source = materialize_tiny("tiny-bert", str(tmp_path / "models"))
    finally:
        os.umask(previous)
    modes = {f: oct(os.stat(os.path.join(source.path, f)).st_mode & 0o777) for f in os.listdir(source.path)}
    assert "model.safetensors" in modes and set(modes.values()) == {oct(0o664)}


# ------------------------------------------------------------------------------- read-only, full, a file


def test_cache_uri_naming_a_file_is_refused(tmp_path):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    with pytest.raises(ValueError, match=f"cache uri '{path}' is a file, expected a directory"):
        BaseCache(str(path))
    for args in (["cache", "ls", "--cache", str(path)], ["cache", "gc"]):
        proc = loftune(*args, cache=str(path))
        assert proc.returncode == 2 and "is a file, expected a directory" in one_line_error(proc)


def test_read_only_cache_gives_one_line_errors(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "ro")
    cache, key = BaseCache(str(root)), make_key()
    build(cache, key)
    cache.writer(make_key(iters=0)).add_file("rest.safetensors", {"w": torch.zeros(1)})  # something for gc
    before = files_under(root)
    mounts.read_only(root)
    for action in (lambda: cache.gc(grace_seconds=0), lambda: cache.rm(key.name),
                   lambda: cache.writer(make_key(model="new")).add_file("rest.safetensors", {"w": torch.zeros(1)}),
                   lambda: cache.lock(make_key(model="new")).__enter__()):
        with pytest.raises(CacheIOError, match=f"^cannot [a-z ]+ {root}/.*: Read-only file system$"):
            action()
    assert cache.verify() == [] and cache.lookup(key) is not None  # reading still works
    assert files_under(root) == before
    for args in (["cache", "gc"], ["cache", "rm", key.name]):
        proc = loftune(*args, cache=str(root))
        assert proc.returncode == 1 and "Read-only file system" in one_line_error(proc)


def test_quantize_of_a_new_key_on_a_read_only_cache_is_one_line(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "ro")
    materialize_tiny("tiny-llama", str(root / "models"))  # the model is there; only the cache cannot take more
    mounts.read_only(root)
    proc = loftune("quantize", "--model", "tiny-llama", "--quant", "nf", "--bits", "2", "--iters", "0",
                   "--method", "qlora", cache=str(root))
    line = one_line_error(proc)
    assert proc.returncode == 1 and "Read-only file system" in line and str(root) in line


def test_full_disk_while_writing_a_shard_leaves_nothing(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "full", size="256k")
    cache, key = BaseCache(str(root)), make_key()
    with pytest.raises(CacheIOError, match=f"cannot write {root}/bases/.*base-00000.safetensors: .*No space left"):
        build(cache, key, shard_elems=200_000)  # 800 kB into 256 kB
    assert files_under(root / "bases") == [] and cache.lookup(key) is None
    assert cache.gc(grace_seconds=0) == [f"{key.name}/"]  # not even an empty entry folder stays
    assert files_under(root / "bases") == [] and os.listdir(root / "bases") == []


def test_full_disk_while_writing_the_manifest_publishes_nothing(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "full", size="256k")
    cache, key = BaseCache(str(root)), make_key()
    with pytest.raises(CacheIOError, match=f"cannot write {root}/bases/{key.name}/manifest.json: No space left"):
        with cache.writer(key) as writer:
            writer.add_file("rest.safetensors", {"w": torch.zeros(100)})
            fill(root)
            writer.commit({})
    assert files_under(root / "bases") == [] and cache.lookup(key) is None and cache.ls() == []


def test_full_disk_while_adding_factors_leaves_the_entry_as_it_was(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "full", size="256k")
    cache, key = BaseCache(str(root)), make_key()
    manifest = build(cache, key)
    before = files_under(root / "bases")
    with pytest.raises(CacheIOError, match="No space left on device"):
        cache.add_files(key.name, {"lora-r2.safetensors": {"a": torch.zeros(100)},
                                   "lora-r4.safetensors": {"a": torch.zeros(200_000)}}, {"factor_ranks": [2, 4]})
    assert files_under(root / "bases") == before and cache.lookup(key) == manifest


def test_full_disk_while_writing_a_tiny_model_leaves_no_tmp_folder(tmp_path, mounts):
    root = mounts.tmpfs(tmp_path / "full", size="2m")
    with pytest.raises(OSError, match=f"model tiny-llama: cannot write it into {root}/models: .*No space left"):
        materialize_tiny("tiny-llama", str(root / "models"))
    assert files_under(root) == []


def test_gc_removes_stale_tiny_model_tmp_folders(tmp_path):
    cache = BaseCache(str(tmp_path / "c"))
    models = Path(cache.root, "models")
    stale, fresh, model = models / "tiny-llama-abc.tmp-123", models / "tiny-llama-abc.tmp-456", models / "tiny-x"
    for folder in (stale, fresh, model):
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"half")
    old = time.time() - 7200
    for path in (stale / "model.safetensors", stale, model / "model.safetensors", model):
        os.utime(path, (old, old))
    assert cache.gc() == ["models/tiny-llama-abc.tmp-123"]
    assert not stale.exists() and fresh.exists() and model.exists()


# -------------------------------------------------------------------- ensure_base on a broken entry (Ray)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return materialize_tiny("tiny-llama", str(tmp_path_factory.mktemp("models")))


def qlora(source) -> BuildRequest:
    """The cheapest build: plain NF2 quantization, no LoftQ iterations."""
    return BuildRequest(source, QuantPlan(QuantSpec("nf", 2, 64)), method="qlora", rank=4, iters=0)


@pytest.mark.usefixtures("ray_session")
def test_broken_entry_on_a_read_only_cache_names_the_repair(tmp_path, mounts, tiny_llama):
    root = mounts.tmpfs(tmp_path / "ro")
    cache, request = BaseCache(str(root)), qlora(tiny_llama)
    manifest = ensure_base(request, cache, progress=False).manifest
    shard = next(p for p in manifest["files"] if p.endswith("base-00000.safetensors"))
    path = root / "bases" / manifest["name"] / shard
    path.write_bytes(path.read_bytes()[:100])
    mounts.read_only(root)
    assert describe_entry(request, cache).startswith(f"broken ({manifest['name']}/{shard}: truncated (100 of ")
    with pytest.raises(CacheError) as info:
        ensure_base(request, cache, progress=False)
    message = str(info.value)
    assert "\n" not in message and f"entry {manifest['name']} is broken" in message and "truncated" in message
    assert message.endswith(f"repair it with: loftune cache rm {manifest['name']} --cache {root}, then run again")


@pytest.mark.usefixtures("ray_session")
def test_foreign_entry_is_never_rebuilt_through_its_link(tmp_path, tiny_llama):
    request = qlora(tiny_llama)
    outside = BaseCache(str(tmp_path / "outside"))
    name = ensure_base(request, outside, progress=False).name
    cache = BaseCache(str(tmp_path / "c"))
    (Path(cache.root) / "bases").mkdir(parents=True)
    (Path(cache.root) / "bases" / name).symlink_to(Path(outside.root) / "bases" / name)
    assert describe_entry(request, cache).startswith(f"foreign (entry {name} is foreign")
    with pytest.raises(CacheForeignError, match=f"remove the link with: loftune cache rm {name} --cache"):
        ensure_base(request, cache, progress=False)
    assert outside.verify() == []


@pytest.mark.usefixtures("ray_session")
def test_cli_reports_and_rebuilds_a_broken_entry(tmp_path, tiny_llama):
    cache = str(tmp_path / "c")
    args = ["quantize", "--model", "tiny-llama", "--quant", "nf", "--bits", "2", "--method", "qlora", "--iters",
            "0", "--actors", "1", "--json"]
    first = loftune(*args, cache=cache)
    assert first.returncode == 0, first.stderr[-3000:]
    name = json.loads(first.stdout)["key"]
    manifest = BaseCache(cache).show(name)
    rest = next(p for p in manifest["files"] if p.endswith("rest.safetensors"))
    original = (Path(cache) / "bases" / name / rest).read_bytes()
    (Path(cache) / "bases" / name / rest).write_bytes(original[:50])
    listing = loftune("cache", "ls", cache=cache)
    assert listing.returncode == 0 and " broken " in listing.stdout and "rest.safetensors: truncated" in listing.stdout
    statuses = [(e["name"], e["status"]) for e in json.loads(loftune("cache", "ls", "--json", cache=cache).stdout)]
    assert statuses == [(name, "broken")]
    again = loftune(*args, cache=cache)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert result["built"] is True and "rest.safetensors: truncated" in result["repaired"][0]
    assert f"base {name}: broken (" in again.stderr and "), rebuilt" in again.stderr
    rebuilt = BaseCache(cache).show(name)
    new_rest = next(p for p in rebuilt["files"] if p.endswith("rest.safetensors"))
    assert (Path(cache) / "bases" / name / new_rest).read_bytes() == original  # content-addressed: identical
    assert BaseCache(cache).verify() == []
