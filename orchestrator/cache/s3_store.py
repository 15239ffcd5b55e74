"""The store of a cache in S3-compatible object storage (s3://bucket/prefix), through s3fs.

A single PUT is atomic already, so files are written in place; tensors travel in one GET or PUT. There is no lock
across hosts, only one inside the process: two hosts may both build a key, the first manifest wins and the second
build is dropped at commit (`EntryWriter.commit`). Object storage has no symbolic links.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from orchestrator.cache.store import (
    Child,
    FileProblem,
    fs_children,
    fs_digest,
    fs_files,
    fs_newest,
    fs_read,
    fs_size,
    mismatch,
    sha256_of,
    storage_errors,
    thread_locked,
)

if TYPE_CHECKING:
    import fsspec
    import torch


class S3Store:
    """A cache root in an S3 bucket."""

    is_local = False

    def __init__(self, uri: str) -> None:
        """The store at `uri`, s3://bucket[/prefix]. ValueError for credentials in it, or no bucket."""
        self.root = _s3_root(uri)  # "bucket/prefix"
        self.uri = f"s3://{self.root}"
        self.fs = _s3_filesystem()

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def where(self, rel: str) -> str:
        """`rel` as messages show it: s3://bucket/prefix/<rel>."""
        return f"s3://{self._path(rel)}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One PUT (or one completed multipart upload): atomic."""
        with storage_errors("write", self.where(rel)):
            self.fs.pipe_file(self._path(rel), data)

    def write_tensors(self, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                      ) -> tuple[str, int]:
        """Serialize `tensors` in memory and PUT them; return the file's sha256 and size."""
        from safetensors.torch import save

        with storage_errors("write", self.where(rel)):
            data = save(tensors, metadata)
            self.fs.pipe_file(self._path(rel), data)
        return sha256_of(data)

    def remove(self, rel: str) -> None:
        """Remove `rel` and every object under it."""
        with contextlib.suppress(FileNotFoundError), storage_errors("remove", self.where(rel), missing_ok=True):
            self.fs.rm(self._path(rel), recursive=True)

    def read_bytes(self, rel: str) -> bytes:
        """The whole object, in one GET."""
        return fs_read(self.fs, self._path(rel), self.where(rel))

    def read_tensors(self, rel: str, record: dict | None) -> dict[str, torch.Tensor]:
        """One GET, hashed and parsed from memory."""
        from safetensors.torch import load

        data = self.read_bytes(rel)
        problem = mismatch(record, *sha256_of(data)) if record is not None else None
        if problem:
            raise FileProblem(problem)
        return load(data)

    def size(self, rel: str) -> int:
        """The object's size in bytes."""
        return fs_size(self.fs, self._path(rel), self.where(rel))

    def digest(self, rel: str) -> tuple[str, int]:
        """The object's sha256 and size."""
        return fs_digest(self.fs, self._path(rel), self.where(rel))

    def exists(self, rel: str) -> bool:
        """Whether an object is at, or under, `rel`."""
        return self.fs.exists(self._path(rel))

    def children(self, rel: str) -> list[Child]:
        """What the prefix `rel` holds directly."""
        return fs_children(self.fs, self._path(rel), self.where(rel))

    def files(self, rel: str) -> dict[str, float | None]:
        """Every object under the prefix `rel`."""
        return fs_files(self.fs, self._path(rel), self.where(rel))

    def newest(self, rel: str) -> float:
        """The newest modification time of the objects at and under `rel`."""
        return fs_newest(self.fs, self._path(rel), self.where(rel))

    def link_in(self, rel: str) -> str | None:
        """None: object storage has no links."""
        return None

    def refuse_links(self, rel: str) -> None:
        """Nothing to refuse: object storage has no links."""

    @contextmanager
    def lock(self, name: str, timeout: float) -> Iterator[None]:
        """Hold entry `name`'s lock across the threads of this process (S3 offers no lock across hosts)."""
        with thread_locked(self.uri, name, timeout):
            yield


def _s3_root(uri: str) -> str:
    parts = urlsplit(uri)
    if "@" in parts.netloc:  # do not echo the uri: it holds a secret
        raise ValueError("cache uri: credentials do not belong in an s3:// uri; "
                         "set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead")
    if not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"cache uri {uri!r}: expected s3://bucket[/prefix]")
    prefix = parts.path.strip("/")
    return f"{parts.netloc}/{prefix}" if prefix else parts.netloc


def _s3_filesystem() -> fsspec.AbstractFileSystem:
    import s3fs  # only S3 caches pay for importing botocore

    endpoint = os.environ.get("LOFTUNE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None
    # Credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, profiles, roles).
    # No listings cache: other hosts write entries, and a stale listing would hide them.
    return s3fs.S3FileSystem(endpoint_url=endpoint, use_listings_cache=False, skip_instance_cache=True)
