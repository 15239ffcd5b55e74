"""Where the bytes of a cache live: the `Store` protocol, and the parts both stores do alike through fsspec.

Every path a store takes is relative to the cache root and '/'-separated ('bases/<name>/manifest.json'); the entry
logic (`orchestrator.cache.entries`) knows the layout, a store only moves bytes. The two stores,
`local_store.LocalStore` and `s3_store.S3Store`, differ in how a file is written atomically, how tensors travel
(streamed from disk, or one GET/PUT), whether links exist and how far a lock reaches.

A store raises CacheIOError, one line naming the operation, the path and the OS reason, when the storage refuses an
operation (read-only, full, no permission); FileNotFoundError passes through, which callers treat as a miss.
"""

from __future__ import annotations

import hashlib
import posixpath
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Protocol

from orchestrator.cache.errors import CacheIOError, CacheLockTimeoutError

if TYPE_CHECKING:
    import fsspec
    import torch

_CHUNK = 8 << 20


class FileProblem(Exception):  # noqa: N818 (not an error of the cache: the entry logic turns it into one)
    """A stored file does not match its record ({"sha256", "bytes"}); the message says how ('truncated (...)')."""


@dataclass(frozen=True)
class Child:
    """One thing directly inside a folder of the store."""

    name: str  # its base name
    is_dir: bool
    is_link: bool  # a symbolic link (never on S3): the cache writes none and follows none


class Store(Protocol):
    """The storage of one cache: bytes at paths relative to its root."""

    uri: str  # where the cache lives, as messages show it: '/abs/path' or 's3://bucket/prefix'
    root: str  # the root as the store's fsspec filesystem names it: '/abs/path' or 'bucket/prefix'
    is_local: bool  # a local directory (where run.work_dir puts the built-in tiny models); entries never ask

    def where(self, rel: str) -> str:
        """`rel` as messages show it: '<root>/<rel>' or 's3://<root>/<rel>'."""

    def read_bytes(self, rel: str) -> bytes:
        """The whole file (FileNotFoundError when absent)."""

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write the file atomically: a reader sees the old file, or none, or all of `data`."""

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                      ) -> tuple[str, int]:
        """Save `tensors` atomically as a safetensors file; return its sha256 and size."""

    def read_tensors(self, rel: str, record: dict | None) -> dict[str, torch.Tensor]:
        """The tensors of a safetensors file, checked against `record` first unless it is None.

        FileProblem when the file differs from its record, FileNotFoundError when it is absent, SafetensorError
        when it does not parse."""

    def size(self, rel: str) -> int:
        """The file's size in bytes (FileNotFoundError when absent)."""

    def digest(self, rel: str) -> tuple[str, int]:
        """The file's sha256 and size, streamed (FileNotFoundError when absent)."""

    def exists(self, rel: str) -> bool:
        """Whether anything is at `rel`."""

    def children(self, rel: str) -> list[Child]:
        """What the folder `rel` holds directly (FileNotFoundError when absent)."""

    def files(self, rel: str) -> dict[str, float | None]:
        """Every file below the folder `rel`, by its path relative to `rel`, with its modification time."""

    def newest(self, rel: str) -> float:
        """The newest modification time of `rel` and everything under it (now, when nothing tells)."""

    def remove(self, rel: str) -> None:
        """Remove `rel` and everything under it; no error if absent. A link is unlinked, never followed."""

    def link_in(self, rel: str) -> str | None:
        """The first symbolic link from the root down to `rel` (itself included), relative to the root."""

    def refuse_links(self, rel: str) -> None:
        """CacheForeignError if a symbolic link sits between the root and `rel`: it may lead anywhere."""

    def lock(self, name: str, timeout: float) -> AbstractContextManager[None]:
        """Hold the lock of entry `name` (reentrant in a thread); CacheLockTimeoutError after `timeout` s."""


# ------------------------------------------------------------------------------------ storage failures


def _reason(exc: BaseException) -> str:
    """The OS's words for an error ('Read-only file system'), else the exception's message."""
    return getattr(exc, "strerror", None) or str(exc)


@contextmanager
def storage_errors(action: str, where: str, missing_ok: bool = False) -> Iterator[None]:
    """Turn the storage refusing an operation (read-only, full, no permission) into one CacheIOError line naming
    the path and the OS reason. With `missing_ok`, FileNotFoundError passes through: callers treat it as a miss."""
    try:
        yield
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            raise
        raise CacheIOError(f"cannot {action} {where}: {_reason(exc)}") from None


# --------------------------------------------------------------------------------------- file records


def mismatch(record: dict, sha256: str, size: int) -> str | None:
    """What is wrong with a file of `size` bytes and hash `sha256`, against its manifest record; None if nothing."""
    if size < record["bytes"]:
        return f"truncated ({size} of {record['bytes']} bytes)"
    if size > record["bytes"]:
        return f"size mismatch ({size} bytes, expected {record['bytes']})"
    if sha256 != record["sha256"]:
        return f"sha256 mismatch (expected {record['sha256']}, got {sha256})"
    return None


def file_problem(store: Store, rel: str, record: dict, hashes: bool = True) -> str | None:
    """What is wrong with the file at `rel` against its manifest record (its sha256 only with `hashes`); None if
    it is intact."""
    try:
        size = store.size(rel)
        if size != record["bytes"] or not hashes:  # cheap check first: no need to hash a truncated file
            return mismatch(record, record["sha256"], size)
        return mismatch(record, *store.digest(rel))
    except FileNotFoundError:
        return "missing"
    except CacheIOError as exc:  # e.g. another user's file this one may not read: the entry is unusable here
        return str(exc)


def sha256_of(data: bytes) -> tuple[str, int]:
    """The sha256 and size of bytes held in memory."""
    return hashlib.sha256(data).hexdigest(), len(data)


# ------------------------------------------------------------------------- what both stores do alike


def fs_read(fs: fsspec.AbstractFileSystem, path: str, where: str) -> bytes:
    """The bytes at `path` (one GET on S3)."""
    with storage_errors("read", where, missing_ok=True):
        return fs.cat_file(path)


def fs_size(fs: fsspec.AbstractFileSystem, path: str, where: str) -> int:
    """The size of the file at `path`."""
    with storage_errors("read", where, missing_ok=True):
        return fs.size(path)


def fs_digest(fs: fsspec.AbstractFileSystem, path: str, where: str) -> tuple[str, int]:
    """The sha256 and size of the file at `path`, read in chunks."""
    with storage_errors("read", where, missing_ok=True):
        return sha256_file(fs, path)


def sha256_file(fs: fsspec.AbstractFileSystem, path: str) -> tuple[str, int]:
    """fs_digest without turning OSError into CacheIOError (for callers that name their own action)."""
    digest, size = hashlib.sha256(), 0
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def fs_children(fs: fsspec.AbstractFileSystem, path: str, where: str) -> list[Child]:
    """What the folder at `path` holds directly."""
    with storage_errors("list", where, missing_ok=True):
        infos = fs.ls(path, detail=True)
    return [Child(posixpath.basename(i["name"].rstrip("/")), i["type"] == "directory", bool(i.get("islink")))
            for i in infos]


def fs_files(fs: fsspec.AbstractFileSystem, path: str, where: str) -> dict[str, float | None]:
    """Every file below the folder at `path`, by its path relative to it, with its modification time."""
    with storage_errors("list", where, missing_ok=True):
        found = fs.find(path, detail=True)
    return {file[len(path):].strip("/"): _mtime(info) for file, info in found.items()}


def fs_newest(fs: fsspec.AbstractFileSystem, path: str, where: str) -> float:
    """The newest modification time of `path` and everything under it (a build in progress keeps it young)."""
    with storage_errors("list", where, missing_ok=True):
        times = [_mtime(i) for i in fs.find(path, withdirs=True, detail=True).values()]
    return max((t for t in times if t is not None), default=time.time())


def _mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict: 'mtime' locally, 'LastModified' on S3."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified")
    return modified.timestamp() if isinstance(modified, datetime) else None


# ----------------------------------------------------------------------------------------- thread locks

# One lock per (cache, entry) for the whole process, shared by every BaseCache object, so threads never build one
# key twice. Reentrant, so add_files may run inside lock().
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextmanager
def thread_locked(uri: str, name: str, timeout: float) -> Iterator[float]:
    """Hold this process's lock of entry `name` in the cache at `uri`; yield the deadline (monotonic seconds)
    by which a further lock (a lock file) must be acquired."""
    deadline = time.monotonic() + timeout
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(f"{uri}/locks/{name}", threading.RLock())
    if not lock.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
        raise CacheLockTimeoutError(f"entry {name}: lock not acquired within {timeout} s (in this process)")
    try:
        yield deadline
    finally:
        lock.release()
