"""Writing an entry: one build into its own folder, published by writing the manifest last."""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING

from orchestrator.cache.errors import CacheCorruptError, CacheError, CacheForeignError, CacheIOError
from orchestrator.cache.key import FORMAT_VERSION, BaseCacheKey
from orchestrator.cache.manifest import (
    check_extra,
    check_file_name,
    entry_dir,
    new_build_id,
    now_iso,
    read_manifest,
    write_manifest,
)
from orchestrator.cache.store import Store, sha256_of

if TYPE_CHECKING:
    import torch


def write_tensors(store: Store, rel: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None
                  ) -> dict:
    """Save `tensors` as safetensors at `rel`; return the file's manifest record (sha256, bytes)."""
    from safetensors import SafetensorError

    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ValueError("metadata: safetensors metadata maps str to str")
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    try:
        sha256, size = store.write_tensors(rel, tensors, metadata)
    except SafetensorError as exc:  # safetensors reports a full disk as its own error, not as an OSError
        raise CacheIOError(f"cannot write {store.where(rel)}: {exc}") from None
    return {"sha256": sha256, "bytes": size}


class EntryWriter:
    """Writes one build of an entry into its own build folder; commit() publishes it by writing the manifest last.

    As a context manager, leaving the block without commit() (an exception, or a forgotten commit) aborts the build.
    """

    def __init__(self, store: Store, key: BaseCacheKey) -> None:
        self.store = store
        self.key = key
        self.name = key.name
        self.build_id = new_build_id()
        self.folder = f"{entry_dir(self.name)}/{self.build_id}"  # relative to the cache root
        self.files: dict[str, dict] = {}
        self.state = "open"  # -> "committed" | "aborted"

    def __enter__(self) -> EntryWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.state == "open":
            self.abort()

    def add_file(self, file: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Save `tensors` as `<build folder>/<file>` (a .safetensors name) and record its sha256 and size."""
        self._check_open()
        rel = self._new_rel(check_file_name(file))
        self.files[rel] = write_tensors(self.store, f"{self.folder}/{file}", tensors, metadata)

    def add_json(self, file: str, data: bytes) -> None:
        """Save `data`, the bytes of a JSON document, as `<build folder>/<file>` (a relative .json path such as
        'tokenizer/tokenizer.json') and record its sha256 and size. ValueError if `data` is not JSON."""
        self._check_open()
        rel = self._new_rel(check_file_name(file, ".json"))
        try:
            json.loads(data)  # the cache holds safetensors and JSON only
        except ValueError as exc:
            raise ValueError(f"file {file!r}: not a JSON document ({exc})") from None
        self.store.write_bytes(f"{self.folder}/{file}", data)
        sha256, size = sha256_of(data)
        self.files[rel] = {"sha256": sha256, "bytes": size}

    def _new_rel(self, file: str) -> str:
        rel = f"{self.build_id}/{file}"
        if rel in self.files:
            raise ValueError(f"file {file!r} was already added to this build")
        return rel

    def commit(self, extra: dict | None = None) -> dict:
        """Publish the build: write manifest.json (key, build_id, files, created, plus `extra`) and return it.

        If another build of this key was published meanwhile (a lost race), that entry is kept and returned, and
        this build's folder is removed: the race cost duplicate work only. A broken manifest is replaced.
        """
        self._check_open()
        extra = check_extra({} if extra is None else extra)
        try:
            existing = read_manifest(self.store, self.name)
        except CacheForeignError:
            raise  # never publish through a link
        except CacheCorruptError:
            existing = None  # a broken manifest is replaced by this build
        if existing is not None:
            self.abort()
            return existing
        for rel, record in self.files.items():  # a gc during a very long unlocked build could have removed them
            if not self._has_size(f"{self.folder}/{rel.split('/', 1)[1]}", record["bytes"]):
                raise CacheError(f"entry {self.name}: build {self.build_id} lost {rel} before commit; nothing was "
                                 "published")
        manifest = {**copy.deepcopy(extra), "format_version": FORMAT_VERSION, "name": self.name,
                    "key": self.key.fields(), "build_id": self.build_id, "files": dict(self.files),
                    "created": now_iso()}
        write_manifest(self.store, self.name, manifest)
        self.state = "committed"
        return manifest

    def abort(self) -> None:
        """Remove this build's folder. A no-op after commit()."""
        if self.state == "committed":
            return
        self.state = "aborted"
        if self.store.link_in(self.folder) is None:  # behind a link nothing was written, nothing is ours
            self.store.remove(self.folder)

    def _has_size(self, rel: str, size: int) -> bool:
        try:
            return self.store.size(rel) == size
        except FileNotFoundError:
            return False

    def _check_open(self) -> None:
        if self.state != "open":
            raise CacheError(f"entry {self.name}: build {self.build_id} is already {self.state}")
