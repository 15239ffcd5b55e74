"""The store of a cache in a local directory (also what an NFS / ReadWriteMany mount looks like).

Files are written under a temporary name beside their place and renamed into place, so no reader sees half a file;
builders of one entry serialize on a `filelock` lock file under <root>/locks, across processes and hosts sharing
the directory. Every file is written with one mode, 0o666 filtered through the umask, so a team cache whose users
share a group and umask 002 is readable (and repairable) by all of them (docs/deploy.md). Symbolic links are
never written and never followed: one below the root makes what lies behind it foreign.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

import fsspec
from filelock import FileLock, Timeout

from orchestrator.cache.errors import CacheForeignError, CacheLockTimeoutError
from orchestrator.cache.store import (
    Child,
    FileProblem,
    file_problem,
    fs_children,
    fs_digest,
    fs_files,
    fs_newest,
    fs_read,
    fs_size,
    sha256_file,
    storage_errors,
    thread_locked,
)

if TYPE_CHECKING:
    import torch

TMP_PREFIX = ".tmp-"  # cannot start a plain name (errors.is_safe): a temporary file is never taken for an entry's

# The lock file of an entry is shared by every BaseCache object of the process, like its thread lock, which makes
# lock() reentrant in a thread (add_files inside lock()).
_FILE_LOCKS: dict[str, FileLock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_UMASK_GUARD = threading.Lock()


class LocalStore:
    """A cache root in the local filesystem."""

    is_local = True

    def __init__(self, uri: str) -> None:
        """The store at `uri`, a path or file:///path. ValueError when it names an existing file."""
        self.root = _local_root(uri)  # an absolute path
        if os.path.isfile(self.root):
            raise ValueError(f"cache uri {uri!r} is a file, expected a directory (the cache root; it is "
                             "created on the first build)")
        self.uri = self.root
        self.fs = fsspec.filesystem("file")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def where(self, rel: str) -> str:
        """`rel` as messages show it: its absolute path."""
        return self._path(rel)

    # ------------------------------------------------------------------------------------------ writing

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write `data` under a temporary name, then rename it into place."""
        path = self._path(rel)
        with storage_errors("write", path):
            self.refuse_links(rel)

            def write(tmp: str) -> None:
                with open(tmp, "wb") as f:
                    f.write(data)

            _atomic_write(path, write)

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                      ) -> tuple[str, int]:
        """Save `tensors` like write_bytes; return the file's sha256 and size."""
        from safetensors.torch import save_file

        path = self._path(rel)
        with storage_errors("write", path):
            self.refuse_links(rel)
            # save_file streams to disk: no second in-memory copy of a GB-sized shard
            _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata))
            return sha256_file(self.fs, path)

    def remove(self, rel: str) -> None:
        """Remove `rel` and everything under it; a link at `rel` is unlinked, one above it refused."""
        link = self.link_in(rel)
        if link is not None and link != rel:
            self.refuse_links(rel)  # what lies behind the link is not the cache's to delete
        path = self._path(rel)
        with contextlib.suppress(FileNotFoundError), storage_errors("remove", path, missing_ok=True):
            if link is not None:
                os.unlink(path)
            else:
                self.fs.rm(path, recursive=True)  # rmtree unlinks links inside, never follows them

    # ------------------------------------------------------------------------------------------ reading

    def read_bytes(self, rel: str) -> bytes:
        """The whole file."""
        return fs_read(self.fs, self._path(rel), self.where(rel))

    def read_tensors(self, rel: str, record: dict | None) -> dict[str, torch.Tensor]:
        """Check the file on disk against `record` (a stat, then a streamed hash), then read its tensors."""
        from safetensors.torch import load_file

        path = self._path(rel)
        with storage_errors("read", path, missing_ok=True):
            problem = file_problem(self, rel, record) if record is not None else None
            if problem:
                raise FileProblem(problem)
            # pread copies into tensors we own: no memory map of a file that could change under us
            return load_file(path, backend="pread")

    def size(self, rel: str) -> int:
        """The file's size in bytes."""
        return fs_size(self.fs, self._path(rel), self.where(rel))

    def digest(self, rel: str) -> tuple[str, int]:
        """The file's sha256 and size."""
        return fs_digest(self.fs, self._path(rel), self.where(rel))

    def exists(self, rel: str) -> bool:
        """Whether anything is at `rel`."""
        return self.fs.exists(self._path(rel))

    def children(self, rel: str) -> list[Child]:
        """What the folder `rel` holds directly, links included (flagged)."""
        return fs_children(self.fs, self._path(rel), self.where(rel))

    def files(self, rel: str) -> dict[str, float | None]:
        """Every file below the folder `rel` (also behind links inside it: check link_in before acting)."""
        return fs_files(self.fs, self._path(rel), self.where(rel))

    def newest(self, rel: str) -> float:
        """The newest modification time of `rel` and everything under it."""
        return fs_newest(self.fs, self._path(rel), self.where(rel))

    # -------------------------------------------------------------------------------------------- links

    def link_in(self, rel: str) -> str | None:
        """The first symbolic link on the way from the root down to `rel` (itself included)."""
        parts = rel.split("/")
        for depth in range(1, len(parts) + 1):
            if os.path.islink(self._path("/".join(parts[:depth]))):
                return "/".join(parts[:depth])
        return None

    def refuse_links(self, rel: str) -> None:
        """CacheForeignError if a symbolic link sits between the root and `rel`."""
        link = self.link_in(rel)
        if link is None:
            return
        target = "?"
        with contextlib.suppress(OSError):
            target = os.readlink(self._path(link))
        parts = rel.split("/")  # an entry lives at bases/<name>/: a link on the way to it makes it foreign
        subject = f"entry {parts[1]} is foreign" if len(parts) > 1 and parts[0] == "bases" else \
            f"refusing {self._path(rel)}"
        raise CacheForeignError(f"{subject}: {self._path(link)} is a symbolic link to {target} (the cache writes "
                                "no links and follows none)")

    # -------------------------------------------------------------------------------------------- locks

    @contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        """Hold entry `name`'s thread lock, then its lock file <root>/locks/<name>.lock. CacheIOError when the lock
        file cannot be opened (a read-only cache)."""
        with thread_locked(self.uri, name, timeout) as deadline:
            file_lock = self._file_lock(name)
            self._acquire(name, file_lock, timeout, deadline)
            try:
                yield
            finally:
                file_lock.release()

    def _file_lock(self, name: str) -> FileLock:
        path = self._path(f"locks/{name}.lock")
        with _FILE_LOCKS_GUARD:
            if path not in _FILE_LOCKS:
                # no explicit mode: the lock file follows the umask, so a group-shared cache stays lockable
                _FILE_LOCKS[path] = FileLock(path)
            return _FILE_LOCKS[path]

    def _acquire(self, name: str, file_lock: FileLock, timeout: float, deadline: float) -> None:
        self.refuse_links(f"locks/{name}.lock")
        with storage_errors("open the lock file", file_lock.lock_file):
            os.makedirs(os.path.dirname(file_lock.lock_file), exist_ok=True)
            try:
                file_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except Timeout:  # an OSError too: raised before storage_errors would call it a storage failure
                raise CacheLockTimeoutError(
                    f"entry {name}: lock {file_lock.lock_file} not acquired within {timeout} s") from None


def _local_root(uri: str) -> str:
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"cache uri {uri!r}: file:// takes a local path (file:///path), not a host")
        uri = unquote(parts.path)
    return os.path.abspath(os.path.expanduser(uri))


def file_mode() -> int:
    """The mode of every file the cache writes: 0o666 filtered through the process umask (0o664 under umask 002)."""
    # /proc tells the umask without changing it; os.umask can only read it by setting it, which would race with
    # other threads creating files, so that fallback sets a strict value for the instant it takes, under a lock
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    with _UMASK_GUARD:
        umask = os.umask(0o077)
        os.umask(umask)
    return 0o666 & ~umask


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Write through `write(tmp)` to a unique temporary name beside `path`, then rename: no reader sees half a file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # safetensors writes 0600 whatever the umask: one mode for every file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
