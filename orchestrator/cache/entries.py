"""`BaseCache`: the operations on the entries of one cache (lookup, show, read, verify, add files, ls, rm, gc),
written once against the `Store` protocol, whichever store holds the bytes."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from orchestrator.cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheForeignError,
    CacheMissError,
    check_name,
    check_relpath,
)
from orchestrator.cache.gc import GC_GRACE_SECONDS, collect
from orchestrator.cache.key import BaseCacheKey, name_of
from orchestrator.cache.local_store import LocalStore
from orchestrator.cache.manifest import (
    MANIFEST,
    check_extra,
    check_file_name,
    deep_merge,
    entry_dir,
    entry_names,
    file_problems,
    read_manifest,
    write_manifest,
)
from orchestrator.cache.s3_store import S3Store
from orchestrator.cache.store import FileProblem, Store, mismatch, sha256_of
from orchestrator.cache.writer import EntryWriter, write_tensors

if TYPE_CHECKING:
    import torch

DEFAULT_URI = "~/.cache/loftune"
LOCK_TIMEOUT_SECONDS = 3600.0


def resolve_uri(uri: str | None = None) -> str:
    """The cache location: `uri`, else $LOFTUNE_CACHE, else ~/.cache/loftune."""
    return uri or os.environ.get("LOFTUNE_CACHE") or DEFAULT_URI


def open_store(uri: str) -> Store:
    """The store for `uri`: a local path or file://path, or s3://bucket/prefix. ValueError for anything else."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", uri)
    scheme = match.group(1).lower() if match else ""
    if scheme in ("", "file"):
        return LocalStore(uri)
    if scheme == "s3":
        return S3Store(uri)
    raise ValueError(f"cache uri {uri!r}: unsupported scheme {scheme!r}; "
                     "supported: a local path, file://path, s3://bucket/prefix")


class BaseCache:
    """The cache of quantized bases at one location: a local directory or s3://bucket/prefix."""

    def __init__(self, uri: str | None = None) -> None:
        """Open the cache at `uri`, else $LOFTUNE_CACHE, else ~/.cache/loftune. Nothing is created yet.

        ValueError for a uri no cache can live at: an unsupported scheme, credentials in it, an existing file."""
        self.store = open_store(resolve_uri(uri))
        self.uri = self.store.uri  # '/abs/path' or 's3://bucket/prefix'
        self.root = self.store.root  # '/abs/path' or 'bucket/prefix'
        self.is_local = self.store.is_local

    def __repr__(self) -> str:
        return f"BaseCache({self.uri!r})"

    # ------------------------------------------------------------------------------------------- reading

    def lookup(self, key_or_name: BaseCacheKey | str) -> dict | None:
        """The parsed manifest of the entry, or None if it does not exist (has no manifest).

        CacheCorruptError for a manifest that is unreadable, rejected or written for another key; CacheForeignError
        (a CacheCorruptError) for a foreign entry."""
        name = name_of(key_or_name)
        manifest = read_manifest(self.store, name)
        if manifest is not None and isinstance(key_or_name, BaseCacheKey) and manifest["key"] != key_or_name.fields():
            raise CacheCorruptError(f"entry {name}: its manifest was written for another key")
        return manifest

    def show(self, name: str) -> dict:
        """The manifest of entry `name`; CacheMissError if there is none."""
        manifest = self.lookup(name)
        if manifest is None:
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        return manifest

    def read_file(self, name: str, file: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one .safetensors file of an entry: a manifest key ('<build_id>/<file>') or a bare name.

        With `verify`, the size and sha256 are checked against the manifest first; CacheCorruptError if they differ.
        JSON files are read with read_bytes.
        """
        check_relpath(file, "file")
        manifest = self.show(name)
        rel = _resolve_file(name, manifest, file)
        if not rel.endswith(".safetensors"):
            raise ValueError(f"entry {name}: {rel} is not a tensor file; read it with read_bytes")
        return self._read(name, manifest, rel, verify)

    def read_bytes(self, name: str, file: str, verify: bool = True) -> bytes:
        """The bytes of one JSON file of an entry (e.g. '<build_id>/tokenizer/tokenizer.json', or a bare name).

        With `verify`, the size and sha256 are checked against the manifest; CacheCorruptError if they differ.
        """
        check_relpath(file, "file")
        manifest = self.show(name)
        rel = _resolve_file(name, manifest, file)
        if not rel.endswith(".json"):
            raise ValueError(f"entry {name}: {rel} is not a JSON file; read tensors with read_file")
        path = f"{entry_dir(name)}/{rel}"
        try:
            data = self.store.read_bytes(path)
        except FileNotFoundError:
            raise CacheCorruptError(f"entry {name}: {self.store.where(path)}: missing") from None
        problem = mismatch(manifest["files"][rel], *sha256_of(data)) if verify else None
        if problem:
            raise CacheCorruptError(f"entry {name}: {self.store.where(path)}: {problem}")
        return data

    def read_all(self, name: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of every .safetensors file of an entry, merged (JSON files are skipped). A tensor name in two
        files (factors of two ranks) is an error: read those files with read_file."""
        manifest = self.show(name)
        tensors: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        for rel in sorted(r for r in manifest["files"] if r.endswith(".safetensors")):
            for tensor_name, tensor in self._read(name, manifest, rel, verify).items():
                if tensor_name in tensors:
                    raise CacheError(f"entry {name}: tensor {tensor_name!r} is in both {origin[tensor_name]} and "
                                     f"{rel}; read those files one at a time with read_file")
                tensors[tensor_name], origin[tensor_name] = tensor, rel
        return tensors

    def _read(self, name: str, manifest: dict, rel: str, verify: bool) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError

        path = f"{entry_dir(name)}/{rel}"
        where = f"entry {name}: {self.store.where(path)}"
        try:
            return self.store.read_tensors(path, manifest["files"][rel] if verify else None)
        except FileProblem as exc:
            raise CacheCorruptError(f"{where}: {exc}") from None
        except FileNotFoundError:
            raise CacheCorruptError(f"{where}: missing") from None
        except SafetensorError as exc:  # only reachable with verify=False, or a file corrupt at write time
            raise CacheCorruptError(f"{where}: not a readable safetensors file ({exc})") from None

    # ------------------------------------------------------------------------------------------ checking

    def problems(self, name: str, hashes: bool = True) -> list[str]:
        """What is wrong with entry `name`, e.g. '<entry>/<build_id>/<file>: truncated (10 of 20 bytes)': a manifest
        that is unreadable, rejected or foreign, files missing, of the wrong size or (with `hashes`) the wrong
        sha256. [] when it is intact, and when it has no manifest (it does not exist). Without `hashes` it costs
        one stat per file."""
        return self._problems(check_name(name, "entry name"), hashes) or []

    def _problems(self, name: str, hashes: bool) -> list[str] | None:
        """problems(), or None when the entry has no manifest."""
        try:
            manifest = read_manifest(self.store, name)
        except CacheError as exc:  # corrupt, foreign, or unreadable (CacheIOError)
            return [str(exc)]
        return None if manifest is None else file_problems(self.store, name, manifest, hashes)

    def verify(self, name: str | None = None) -> list[str]:
        """Problems of entry `name` (every entry when None), sizes and sha256, e.g. '<entry>/<build_id>/<file>:
        sha256 mismatch'; [] when clean. Foreign entries are reported. Entries without a manifest do not exist
        and are not checked (gc removes them); a `name` without one is a CacheMissError."""
        if name is None:
            return [p for entry in entry_names(self.store) for p in self._problems(entry, hashes=True) or []]
        found = self._problems(check_name(name, "entry name"), hashes=True)
        if found is None:
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        return found

    def ls(self) -> list[dict]:
        """One summary per entry that has a manifest, broken and foreign ones included: name, status ('ok',
        'broken' or 'foreign'), problem (the first one; None when ok), bytes, files, created, build_id, key (None
        where the manifest cannot be read). File sizes are checked, not hashes (verify does that)."""
        return [s for s in (self._summary(name) for name in entry_names(self.store)) if s is not None]

    def _summary(self, name: str) -> dict | None:
        summary = {"name": name, "status": "ok", "problem": None, "bytes": None, "files": None, "created": None,
                   "build_id": None, "key": None}
        try:
            manifest = read_manifest(self.store, name)
        except CacheError as exc:  # corrupt, foreign, or unreadable (CacheIOError)
            return {**summary, "status": "foreign" if isinstance(exc, CacheForeignError) else "broken",
                    "problem": str(exc)}
        if manifest is None:
            return None  # never published: it does not exist (gc removes it)
        problems = file_problems(self.store, name, manifest, hashes=False)
        return {**summary, "status": "broken" if problems else "ok", "problem": problems[0] if problems else None,
                "bytes": sum(r["bytes"] for r in manifest["files"].values()), "files": len(manifest["files"]),
                "created": manifest.get("created"), "build_id": manifest["build_id"], "key": manifest["key"]}

    # ------------------------------------------------------------------------------------------- writing

    @contextmanager
    def lock(self, key_or_name: BaseCacheKey | str, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
        """Hold the entry's lock: one builder per key. Reentrant within a thread.

        Local caches lock across processes and hosts sharing the directory (a lock file under <root>/locks);
        S3 caches only across the threads of this process. CacheIOError when the lock file cannot be opened
        (a read-only cache).
        """
        name = name_of(key_or_name)
        if timeout < 0:
            raise ValueError(f"timeout: expected seconds >= 0, got {timeout!r}")
        with self.store.lock(name, timeout):
            yield

    def writer(self, key: BaseCacheKey) -> EntryWriter:
        """A writer for a new build of `key`'s entry, in a fresh build folder. Use it as a context manager."""
        return EntryWriter(self.store, key)

    def add_files(self, name: str, files: dict[str, dict[str, torch.Tensor]], extra_update: dict) -> dict:
        """Add files (e.g. LoRA factors for another rank) to an existing entry and deep-merge `extra_update` into
        its manifest, under the entry's lock. Files are write-once: one already in the entry is a ValueError.
        Returns the new manifest. On a failure (a full disk) the files written so far are removed again."""
        check_name(name, "entry name")
        check_extra(extra_update)
        for file in files:
            check_file_name(file)
        with self.lock(name):
            manifest = self.show(name)
            build_id = manifest["build_id"]
            clash = sorted(f for f in files if f"{build_id}/{f}" in manifest["files"])
            if clash:
                raise ValueError(f"entry {name} already has {clash}; entry files are write-once")
            records: dict[str, dict] = {}
            try:
                for file, tensors in files.items():
                    records[f"{build_id}/{file}"] = write_tensors(self.store, f"{entry_dir(name)}/{build_id}/{file}",
                                                                  tensors, None)
                manifest = self.show(name)  # re-read: on S3 another host may have changed it meanwhile
                manifest["files"].update(records)
                deep_merge(manifest, extra_update)
                write_manifest(self.store, name, manifest)
            except BaseException:
                for rel in records:  # no manifest names them: nothing half-added stays behind
                    with contextlib.suppress(CacheError):
                        self.store.remove(f"{entry_dir(name)}/{rel}")
                raise
            return manifest

    # ------------------------------------------------------------------------------------------ removing

    def unpublish(self, name: str) -> None:
        """Remove only the manifest of entry `name`: readers then see a miss and a rebuild's commit publishes (how
        a broken entry is repaired, under its lock). Its files stay until gc. No error if there is none."""
        self.store.remove(f"{entry_dir(name)}/{MANIFEST}")

    def rm(self, name: str) -> str:
        """Remove entry `name` (with or without a manifest); CacheMissError if there is nothing to remove.

        A foreign entry whose directory is a link loses only the link, never what it points to. Returns 'link'
        then, else 'entry'."""
        entry = entry_dir(name)
        if self.store.link_in(entry) == entry:
            self.store.remove(entry)
            return "link"
        self.store.refuse_links(entry)  # a link further up (bases/ itself): nothing behind it is ours to delete
        if not self.store.exists(entry):
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        self.unpublish(name)  # first: readers then see a miss, never a half-removed entry
        self.store.remove(entry)
        return "entry"

    def gc(self, grace_seconds: float = GC_GRACE_SECONDS) -> list[str]:
        """Remove what no manifest references and nothing touched for `grace_seconds`: build folders of crashed or
        lost builds, entries without a manifest, stale temporary files, and stale `models/*.tmp-*` folders of
        tiny models. Entries whose lock is held (a build is running), entries with an unreadable manifest and
        foreign entries are left alone. Returns what was removed."""
        return collect(self.store, grace_seconds)


def _resolve_file(name: str, manifest: dict, file: str) -> str:
    """The manifest key of `file`: itself, or the one file of the entry with that bare name."""
    if file in manifest["files"]:
        return file
    matches = [rel for rel in manifest["files"] if rel.rsplit("/", 1)[-1] == file]
    if "/" not in file and len(matches) == 1:
        return matches[0]
    raise CacheMissError(f"entry {name} has no file {file!r} (it has {sorted(manifest['files'])})")
