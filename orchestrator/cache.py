"""The content-addressed cache of quantized bases (DESIGN.md, "The cache of quantized bases").

Layout, the same on every backend::

    <root>/bases/<name>/manifest.json                   written LAST: an entry without it does not exist
    <root>/bases/<name>/<build_id>/<file>.safetensors   one fresh folder per build attempt
    <root>/bases/<name>/<build_id>/config.json          the model's config (JSON files are recorded like shards)
    <root>/bases/<name>/<build_id>/tokenizer/*.json     the model's tokenizer, when it has one: an entry is
                                                        self-contained, a copied or moved cache still works
    <root>/locks/<name>.lock                            local backend only
    <root>/models/<tiny model>                          built-in tiny models (workers.model_source); gc removes
                                                        their stale `*.tmp-*` folders

`<name>` is readable plus a hash of every field of the key (`BaseCacheKey.name`). A build writes its files into
its own build folder and only then writes the manifest that names them, so a crashed build leaves an unreferenced
folder (which `gc` removes) and two builders racing on one key cost duplicate work, never a corrupt entry.
Every file of an entry is written with the same mode, 0o666 filtered through the umask, so a team cache whose
users share a group and umask 002 is readable (and repairable) by all of them (docs/deploy.md).

An entry is *broken* when its manifest is unreadable or rejected, or a file is missing, truncated or fails its
sha256 (`problems`); it is *foreign* when a symbolic link sits anywhere below the cache root on the way to it
(the cache never writes links, and never follows one: it could lead out of the cache root). Foreign entries are
listed and reported, never read, written or garbage-collected; `rm` removes only the link.

Backends, both through fsspec:
- a local directory (also what an NFS / ReadWriteMany mount looks like): files are written under a temporary name
  and renamed into place, and builders of one key serialize on a `filelock` lock file;
- S3-compatible object storage through s3fs: a single PUT is atomic already, but there is no lock across hosts,
  only one inside the process. Two hosts may both build a key; the first manifest wins, the second build is
  dropped at commit (see `EntryWriter.commit`).

Failures of the storage (read-only, full, no permission) are raised as `CacheIOError`, one line naming what failed,
the path and the OS reason. Only safetensors and JSON are ever stored or read back: no pickle, no torch.load.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import hashlib
import json
import os
import posixpath
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import fsspec
from filelock import FileLock, Timeout

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
METHODS = ("loftq", "qlora", "qalora", "lora")  # "lora": the full-precision control (bits 16), no quantization
DEFAULT_URI = "~/.cache/loftune"
MANIFEST = "manifest.json"
GC_GRACE_SECONDS = 3600.0
LOCK_TIMEOUT_SECONDS = 3600.0

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_MAX_NAME = 200  # leaves room under the usual 255-byte file-name limit for the temporary-name prefix
_TMP_PREFIX = ".tmp-"  # cannot match _SAFE_NAME, so a temporary file is never mistaken for an entry's file
_CHUNK = 8 << 20
_EXTENSIONS = (".safetensors", ".json")  # the only files an entry holds: nothing else is ever read back
_RESERVED = ("format_version", "name", "key", "build_id", "files", "created")


class CacheError(Exception):
    """Any failure of the cache."""


class CacheCorruptError(CacheError):
    """An entry does not match what was written: a file's hash or size, an unreadable or unsafe manifest."""


class CacheMissError(CacheError):
    """The entry, or a file of it, does not exist."""


class CacheForeignError(CacheCorruptError):
    """A symbolic link sits below the cache root on the way to an entry or one of its files: never followed."""


class CacheLockTimeoutError(CacheError):
    """Waited too long for the lock of an entry (another builder holds it)."""


class CacheIOError(CacheError):
    """The storage refused a read or write (read-only, full, no permission): one line with the path and reason."""


# ------------------------------------------------------------------------------------------------ names


def _is_safe(part: object) -> bool:
    return (isinstance(part, str) and len(part) <= _MAX_NAME and ".." not in part
            and _SAFE_NAME.fullmatch(part) is not None)


def check_name(value: object, what: str = "name") -> str:
    """Return `value` if it is one plain path component (entry, build or file name); else raise ValueError."""
    if not _is_safe(value):
        raise ValueError(f"{what} {value!r} is not a plain name ([A-Za-z0-9._-], at most {_MAX_NAME} characters, "
                         "no '..', no '/'): it cannot escape the cache root")
    return value  # type: ignore[return-value]


def check_relpath(value: object, what: str = "file") -> str:
    """Return `value` if it is a relative path of plain names (e.g. '<build_id>/<file>'); else raise ValueError."""
    if not isinstance(value, str) or not all(_is_safe(part) for part in value.split("/")):
        raise ValueError(f"{what} {value!r} is not a relative path of plain names ([A-Za-z0-9._-], no '..', "
                         "not absolute): it cannot escape the cache root")
    return value


def _check_file_name(file: object, extension: str = ".safetensors") -> str:
    """`file` if it is a relative path of plain names ending in `extension` ('.safetensors' or '.json')."""
    if extension == ".safetensors":
        check_name(file, "file name")  # tensor files sit directly in the build folder
    else:
        check_relpath(file, "file name")
    if not file.endswith(extension):  # type: ignore[union-attr]
        raise ValueError(f"file name {file!r}: expected a {extension} file (entries hold only safetensors and JSON)")
    return file  # type: ignore[return-value]


def _readable(text: str, limit: int) -> str:
    """`text` as a lower-case [a-z0-9.-] name part, at most `limit` characters."""
    part = re.sub(r"[^a-z0-9.-]+", "-", text.lower())
    part = re.sub(r"\.{2,}", ".", part)[:limit].strip(".-")
    return part or "x"


# -------------------------------------------------------------------------------------------------- key


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class BaseCacheKey:
    """Everything a quantized base depends on. Equal keys have equal digests and names, and vice versa."""

    model: str  # readable model name, sanitized into the entry name
    fingerprint: str  # hex sha256 of the weight files (or of the config for config-built models)
    quant: dict  # the resolved quantization plan, JSON-able ({"bits": 16, "dtype": "bfloat16"} for the control)
    quant_label: str  # readable, e.g. "nf2-g64" (or "bf16")
    method: str  # "loftq" | "qlora" | "qalora", or "lora" for the full-precision control
    iters: int
    rank: int | None  # normalized to None when iters <= 1: the base does not depend on the rank then
    targets: tuple[str, ...]  # target module patterns, normalized to sorted and unique
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        for field_name in ("model", "fingerprint", "quant_label"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{field_name}: expected a non-empty string, got {value!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        if not _is_int(self.iters) or self.iters < 0:
            raise ValueError(f"iters: expected an int >= 0, got {self.iters!r}")
        if self.method == "lora" and self.iters:
            raise ValueError(f"iters: the full-precision control (method 'lora') has no LoftQ iterations, "
                             f"got {self.iters!r}")
        if not _is_int(self.format_version):
            raise ValueError(f"format_version: expected an int, got {self.format_version!r}")
        if self.iters > 1 and (not _is_int(self.rank) or self.rank < 0):
            raise ValueError(f"rank: expected an int >= 0 when iters > 1, got {self.rank!r}")
        # Frozen dataclass: normalized values are set through object.__setattr__.
        object.__setattr__(self, "rank", self.rank if self.iters > 1 else None)
        object.__setattr__(self, "quant", _canonical_quant(self.quant))
        object.__setattr__(self, "targets", _canonical_targets(self.targets))

    def __hash__(self) -> int:  # the generated hash would fail on the `quant` dict
        return hash(self.digest)

    def fields(self) -> dict[str, Any]:
        """All fields as a canonical JSON-able dict (a fresh copy)."""
        return {"model": self.model, "fingerprint": self.fingerprint, "quant": copy.deepcopy(self.quant),
                "quant_label": self.quant_label, "method": self.method, "iters": self.iters, "rank": self.rank,
                "targets": list(self.targets), "format_version": self.format_version}

    @property
    def digest(self) -> str:
        """sha256 hex of the canonical JSON of `fields()`."""
        text = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """The entry name, e.g. 'minilm-l6__nf2-g64__loftq-t5-r16__3f9c2a1b0c4d' (the full-precision control:
        'minilm-l6__bf16__lora__<digest>')."""
        run = f"{self.method}-t{self.iters}" + (f"-r{self.rank}" if self.rank is not None else "")
        run = "lora" if self.method == "lora" else run
        return f"{_readable(self.model, 64)}__{_readable(self.quant_label, 48)}__{run}__{self.digest[:12]}"


def _canonical_quant(quant: object) -> dict:
    # A JSON round trip both checks that the plan is JSON-able and turns tuples into lists, so a key built from
    # a plan equals the key read back from a manifest.
    if not isinstance(quant, dict):
        raise ValueError(f"quant: expected a dict, got {type(quant).__name__}")
    try:
        return json.loads(json.dumps(quant, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"quant: not JSON-able ({exc})") from None


def _canonical_targets(targets: object) -> tuple[str, ...]:
    if isinstance(targets, str) or not all(isinstance(t, str) and t for t in targets):  # type: ignore[union-attr]
        raise ValueError(f"targets: expected a sequence of non-empty strings, got {targets!r}")
    if not targets:
        raise ValueError("targets: expected at least one module pattern")
    return tuple(sorted(set(targets)))  # type: ignore[arg-type]


def _name_of(key_or_name: BaseCacheKey | str) -> str:
    if isinstance(key_or_name, BaseCacheKey):
        return key_or_name.name
    return check_name(key_or_name, "entry name")


# ---------------------------------------------------------------------------------------------- backend


def resolve_uri(uri: str | None = None) -> str:
    """The cache location: `uri`, else $LOFTUNE_CACHE, else ~/.cache/loftune."""
    return uri or os.environ.get("LOFTUNE_CACHE") or DEFAULT_URI


def _local_root(uri: str) -> str:
    if uri.lower().startswith("file://"):
        parts = urlsplit(uri)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"cache uri {uri!r}: file:// takes a local path (file:///path), not a host")
        uri = unquote(parts.path)
    return os.path.abspath(os.path.expanduser(uri))


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


# One lock per (cache, entry) for the whole process, shared by every BaseCache object, so threads never build one
# key twice; the FileLock is shared too, which makes lock() reentrant in a thread (add_files inside lock()).
_PROCESS_LOCKS: dict[str, tuple[threading.RLock, FileLock | None]] = {}
_PROCESS_LOCKS_GUARD = threading.Lock()


def _sha256(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def _problem(record: dict, sha256: str, size: int) -> str | None:
    """What is wrong with a file of `size` bytes and hash `sha256`, against its manifest record; None if nothing."""
    if size < record["bytes"]:
        return f"truncated ({size} of {record['bytes']} bytes)"
    if size > record["bytes"]:
        return f"size mismatch ({size} bytes, expected {record['bytes']})"
    if sha256 != record["sha256"]:
        return f"sha256 mismatch (expected {record['sha256']}, got {sha256})"
    return None


def _mtime(info: dict) -> float | None:
    """Modification time (epoch seconds) from an fsspec info dict: 'mtime' locally, 'LastModified' on S3."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified")
    return modified.timestamp() if isinstance(modified, datetime) else None


_UMASK_GUARD = threading.Lock()


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


def _reason(exc: BaseException) -> str:
    """The OS's words for an error ('Read-only file system'), else the exception's message."""
    return getattr(exc, "strerror", None) or str(exc)


@contextmanager
def _storage_errors(action: str, where: str, missing_ok: bool = False) -> Iterator[None]:
    """Turn the storage refusing an operation (read-only, full, no permission) into one CacheIOError line naming
    the path and the OS reason. With `missing_ok`, FileNotFoundError passes through: callers treat it as a miss."""
    try:
        yield
    except OSError as exc:
        if missing_ok and isinstance(exc, FileNotFoundError):
            raise
        raise CacheIOError(f"cannot {action} {where}: {_reason(exc)}") from None


def _atomic_write_local(path: str, write: Callable[[str], None]) -> None:
    """Write through `write(tmp)` to a unique temporary name beside `path`, then rename: no reader sees half a file."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{_TMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}")
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


def _deep_merge(target: dict, update: dict) -> None:
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            _deep_merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def _check_extra(extra: object) -> dict:
    if not isinstance(extra, dict):
        raise ValueError(f"extra: expected a dict, got {type(extra).__name__}")
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra: {clash} are written by the cache itself and cannot be set")
    return extra


def _check_manifest(manifest: object, name: str) -> dict:
    """Raise ValueError unless `manifest` is a manifest of entry `name` whose paths all stay inside the entry."""
    if not isinstance(manifest, dict):
        raise ValueError("manifest is not a JSON object")
    if manifest.get("name") != name:
        raise ValueError(f"manifest names entry {manifest.get('name')!r}, not {name!r}")
    check_name(manifest.get("build_id"), "build_id")
    files = manifest.get("files")
    if not isinstance(files, dict) or not isinstance(manifest.get("key"), dict):
        raise ValueError("manifest lacks 'files' or 'key'")
    for rel, record in files.items():
        check_relpath(rel, "file")
        if not rel.endswith(_EXTENSIONS):
            raise ValueError(f"file {rel!r}: entries hold only {' and '.join(_EXTENSIONS)} files")
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str) and _is_int(record.get("bytes"))):
            raise ValueError(f"file {rel!r}: expected a record with 'sha256' and 'bytes'")
    return manifest


def _new_build_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:16]}"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------ cache


class BaseCache:
    """The cache of quantized bases at one location: a local directory or s3://bucket/prefix."""

    def __init__(self, uri: str | None = None) -> None:
        """Open the cache at `uri`, else $LOFTUNE_CACHE, else ~/.cache/loftune. Nothing is created yet.

        ValueError for a uri no cache can live at: an unsupported scheme, credentials in it, an existing file."""
        raw = resolve_uri(uri)
        match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", raw)
        scheme = match.group(1).lower() if match else ""
        if scheme in ("", "file"):
            self.is_local = True
            self.root = _local_root(raw)  # an absolute path
            if os.path.isfile(self.root):
                raise ValueError(f"cache uri {raw!r} is a file, expected a directory (the cache root; it is "
                                 "created on the first build)")
            self.uri = self.root
            self.fs = fsspec.filesystem("file")
        elif scheme == "s3":
            self.is_local = False
            self.root = _s3_root(raw)  # "bucket/prefix"
            self.uri = f"s3://{self.root}"
            self.fs = _s3_filesystem()
        else:
            raise ValueError(f"cache uri {raw!r}: unsupported scheme {scheme!r}; "
                             "supported: a local path, file://path, s3://bucket/prefix")

    def __repr__(self) -> str:
        return f"BaseCache({self.uri!r})"

    # ---------------------------------------------------------------------------------- paths and raw I/O

    def _entry_dir(self, name: str) -> str:
        return f"{self.root}/bases/{check_name(name, 'entry name')}"

    def _display(self, path: str) -> str:
        return path if self.is_local else f"s3://{path}"

    def _link_in(self, path: str) -> str | None:
        """The first symbolic link on the way from the cache root down to `path` (itself included); None on S3."""
        if not self.is_local:
            return None
        current = self.root
        for part in os.path.relpath(path, self.root).split(os.sep):
            current = os.path.join(current, part)
            if os.path.islink(current):
                return current
        return None

    def _refuse_links(self, path: str) -> None:
        """CacheForeignError if a symbolic link sits between the cache root and `path`: it may lead anywhere."""
        link = self._link_in(path)
        if link is None:
            return
        target = "?"
        with contextlib.suppress(OSError):
            target = os.readlink(link)
        parts = os.path.relpath(path, self.root).split(os.sep)
        subject = f"entry {parts[1]} is foreign" if len(parts) > 1 and parts[0] == "bases" else f"refusing {path}"
        raise CacheForeignError(f"{subject}: {link} is a symbolic link to {target} (the cache writes no links and "
                                "follows none)")

    def _write_bytes(self, path: str, data: bytes) -> None:
        with _storage_errors("write", self._display(path)):
            if self.is_local:
                self._refuse_links(path)

                def write(tmp: str) -> None:
                    with open(tmp, "wb") as f:
                        f.write(data)

                _atomic_write_local(path, write)
            else:
                self.fs.pipe_file(path, data)  # one PUT (or one completed multipart upload): atomic

    def _write_tensors(self, path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict:
        """Save `tensors` as safetensors at `path`; return the file's manifest record (sha256, bytes)."""
        from safetensors import SafetensorError
        from safetensors.torch import save, save_file

        if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("metadata: safetensors metadata maps str to str")
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        try:
            with _storage_errors("write", self._display(path)):
                if self.is_local:  # save_file streams to disk: no second in-memory copy of a GB-sized shard
                    self._refuse_links(path)
                    _atomic_write_local(path, lambda tmp: save_file(tensors, tmp, metadata))
                    sha256, size = self._digest(path)
                else:
                    data = save(tensors, metadata)
                    self.fs.pipe_file(path, data)
                    sha256, size = hashlib.sha256(data).hexdigest(), len(data)
        except SafetensorError as exc:  # safetensors reports a full disk as its own error, not as an OSError
            raise CacheIOError(f"cannot write {self._display(path)}: {exc}") from None
        return {"sha256": sha256, "bytes": size}

    def _digest(self, path: str) -> tuple[str, int]:
        with self.fs.open(path, "rb") as f:
            return _sha256(iter(lambda: f.read(_CHUNK), b""))

    def _remove(self, path: str) -> None:
        """Remove `path` and everything under it; no error if it is absent. A link is unlinked, never followed."""
        link = self._link_in(path)
        if link is not None and link != path:
            self._refuse_links(path)  # what lies behind the link is not the cache's to delete
        with contextlib.suppress(FileNotFoundError), _storage_errors("remove", self._display(path), missing_ok=True):
            if link is not None:
                os.unlink(path)
            else:
                self.fs.rm(path, recursive=True)  # rmtree unlinks links inside, never follows them

    def _newest(self, path: str) -> float:
        """Newest modification time of `path` and everything under it (a build in progress keeps it young)."""
        times = [_mtime(i) for i in self.fs.find(path, withdirs=True, detail=True).values()]
        return max((t for t in times if t is not None), default=time.time())

    def _entry_names(self) -> list[str]:
        try:
            infos = self.fs.ls(f"{self.root}/bases", detail=True)
        except FileNotFoundError:
            return []
        # a linked entry is listed too (as foreign): hiding it would hide what show / rm would act on
        names = (posixpath.basename(i["name"].rstrip("/")) for i in infos
                 if i["type"] == "directory" or i.get("islink"))
        return sorted(n for n in names if _is_safe(n))  # anything else was not written by this cache

    # ------------------------------------------------------------------------------------------ manifests

    def _read_manifest(self, name: str) -> dict | None:
        entry = self._entry_dir(name)
        path = f"{entry}/{MANIFEST}"
        self._refuse_links(path)  # also the entry directory: never read a manifest from outside the cache
        try:
            with _storage_errors("read", self._display(path), missing_ok=True):
                raw = self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        try:
            manifest = _check_manifest(json.loads(raw), name)
        except ValueError as exc:  # also json.JSONDecodeError and UnicodeDecodeError
            kind = "not valid JSON" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else "rejected"
            raise CacheCorruptError(f"entry {name}: manifest {self._display(path)} {kind}: {exc}") from None
        for rel in manifest["files"]:
            self._refuse_links(f"{entry}/{rel}")
        return manifest

    def _write_manifest(self, name: str, manifest: dict) -> None:
        self._write_bytes(f"{self._entry_dir(name)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())

    # ------------------------------------------------------------------------------------------- public

    def lookup(self, key_or_name: BaseCacheKey | str) -> dict | None:
        """The parsed manifest of the entry, or None if it does not exist (has no manifest).

        CacheCorruptError for a manifest that is unreadable, rejected or written for another key; CacheForeignError
        (a CacheCorruptError) for a foreign entry."""
        name = _name_of(key_or_name)
        manifest = self._read_manifest(name)
        if manifest is not None and isinstance(key_or_name, BaseCacheKey) and manifest["key"] != key_or_name.fields():
            raise CacheCorruptError(f"entry {name}: its manifest was written for another key")
        return manifest

    def show(self, name: str) -> dict:
        """The manifest of entry `name`; CacheMissError if there is none."""
        manifest = self.lookup(name)
        if manifest is None:
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        return manifest

    @contextmanager
    def lock(self, key_or_name: BaseCacheKey | str, timeout: float = LOCK_TIMEOUT_SECONDS) -> Iterator[None]:
        """Hold the entry's lock: one builder per key. Reentrant within a thread.

        Local caches lock across processes and hosts sharing the directory (a lock file under <root>/locks);
        S3 caches only across the threads of this process. CacheIOError when the lock file cannot be opened
        (a read-only cache).
        """
        name = _name_of(key_or_name)
        if timeout < 0:
            raise ValueError(f"timeout: expected seconds >= 0, got {timeout!r}")
        deadline = time.monotonic() + timeout
        thread_lock, file_lock = self._process_lock(name)
        if not thread_lock.acquire(timeout=min(timeout, threading.TIMEOUT_MAX)):
            raise CacheLockTimeoutError(f"entry {name}: lock not acquired within {timeout} s (in this process)")
        try:
            if file_lock is not None:
                self._acquire_file_lock(name, file_lock, timeout, deadline)
            try:
                yield
            finally:
                if file_lock is not None:
                    file_lock.release()
        finally:
            thread_lock.release()

    def _acquire_file_lock(self, name: str, file_lock: FileLock, timeout: float, deadline: float) -> None:
        self._refuse_links(file_lock.lock_file)
        with _storage_errors("open the lock file", file_lock.lock_file):
            os.makedirs(os.path.dirname(file_lock.lock_file), exist_ok=True)
            try:
                file_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
            except Timeout:  # an OSError too: raised before _storage_errors would call it a storage failure
                raise CacheLockTimeoutError(
                    f"entry {name}: lock {file_lock.lock_file} not acquired within {timeout} s") from None

    def _process_lock(self, name: str) -> tuple[threading.RLock, FileLock | None]:
        lock_id = f"{self.uri}/locks/{name}"
        with _PROCESS_LOCKS_GUARD:
            if lock_id not in _PROCESS_LOCKS:
                # no explicit mode: the lock file follows the umask, so a group-shared cache stays lockable
                file_lock = FileLock(f"{self.root}/locks/{name}.lock") if self.is_local else None
                _PROCESS_LOCKS[lock_id] = (threading.RLock(), file_lock)
            return _PROCESS_LOCKS[lock_id]

    def writer(self, key: BaseCacheKey) -> EntryWriter:
        """A writer for a new build of `key`'s entry, in a fresh build folder. Use it as a context manager."""
        return EntryWriter(self, key)

    def read_file(self, name: str, file: str, verify: bool = True) -> dict[str, torch.Tensor]:
        """The tensors of one .safetensors file of an entry: a manifest key ('<build_id>/<file>') or a bare name.

        With `verify`, the size and sha256 are checked against the manifest first; CacheCorruptError if they differ.
        JSON files are read with read_bytes.
        """
        check_relpath(file, "file")
        manifest = self.show(name)
        rel = self._resolve_file(name, manifest, file)
        if not rel.endswith(".safetensors"):
            raise ValueError(f"entry {name}: {rel} is not a tensor file; read it with read_bytes")
        return self._read(name, manifest, rel, verify)

    def read_bytes(self, name: str, file: str, verify: bool = True) -> bytes:
        """The bytes of one JSON file of an entry (e.g. '<build_id>/tokenizer/tokenizer.json', or a bare name).

        With `verify`, the size and sha256 are checked against the manifest; CacheCorruptError if they differ.
        """
        check_relpath(file, "file")
        manifest = self.show(name)
        rel = self._resolve_file(name, manifest, file)
        if not rel.endswith(".json"):
            raise ValueError(f"entry {name}: {rel} is not a JSON file; read tensors with read_file")
        path = f"{self._entry_dir(name)}/{rel}"
        try:
            with _storage_errors("read", self._display(path), missing_ok=True):
                data = self.fs.cat_file(path)
        except FileNotFoundError:
            raise CacheCorruptError(f"entry {name}: {self._display(path)}: missing") from None
        problem = _problem(manifest["files"][rel], hashlib.sha256(data).hexdigest(), len(data)) if verify else None
        if problem:
            raise CacheCorruptError(f"entry {name}: {self._display(path)}: {problem}")
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

    def _resolve_file(self, name: str, manifest: dict, file: str) -> str:
        if file in manifest["files"]:
            return file
        matches = [rel for rel in manifest["files"] if rel.rsplit("/", 1)[-1] == file]
        if "/" not in file and len(matches) == 1:
            return matches[0]
        raise CacheMissError(f"entry {name} has no file {file!r} (it has {sorted(manifest['files'])})")

    def _read(self, name: str, manifest: dict, rel: str, verify: bool) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError
        from safetensors.torch import load, load_file

        path = f"{self._entry_dir(name)}/{rel}"
        where = f"entry {name}: {self._display(path)}"
        record = manifest["files"][rel]
        try:
            with _storage_errors("read", self._display(path), missing_ok=True):
                if self.is_local:
                    problem = self._file_problem(path, record) if verify else None
                    if problem:
                        raise CacheCorruptError(f"{where}: {problem}")
                    # pread copies into tensors we own: no memory map of a file that could change under us
                    return load_file(path, backend="pread")
                data = self.fs.cat_file(path)  # one GET, hashed and parsed from memory
            problem = _problem(record, hashlib.sha256(data).hexdigest(), len(data)) if verify else None
            if problem:
                raise CacheCorruptError(f"{where}: {problem}")
            return load(data)
        except FileNotFoundError:
            raise CacheCorruptError(f"{where}: missing") from None
        except SafetensorError as exc:  # only reachable with verify=False, or a file corrupt at write time
            raise CacheCorruptError(f"{where}: not a readable safetensors file ({exc})") from None

    def _has_size(self, path: str, size: int) -> bool:
        try:
            return self.fs.size(path) == size
        except FileNotFoundError:
            return False

    def _file_problem(self, path: str, record: dict, hashes: bool = True) -> str | None:
        """What is wrong with the file at `path` against its manifest record (its sha256 only with `hashes`);
        None if it is intact."""
        try:
            with _storage_errors("read", self._display(path), missing_ok=True):
                size = self.fs.size(path)
                if size != record["bytes"] or not hashes:  # cheap check first: no need to hash a truncated file
                    return _problem(record, record["sha256"], size)
                return _problem(record, *self._digest(path))
        except FileNotFoundError:
            return "missing"
        except CacheIOError as exc:  # e.g. another user's file this one may not read: the entry is unusable here
            return str(exc)

    def problems(self, name: str, hashes: bool = True) -> list[str]:
        """What is wrong with entry `name`, e.g. '<entry>/<build_id>/<file>: truncated (10 of 20 bytes)': a manifest
        that is unreadable, rejected or foreign, files missing, of the wrong size or (with `hashes`) the wrong
        sha256. [] when it is intact, and when it has no manifest (it does not exist). Without `hashes` it costs
        one stat per file."""
        return self._problems(check_name(name, "entry name"), hashes) or []

    def _problems(self, name: str, hashes: bool) -> list[str] | None:
        """problems(), or None when the entry has no manifest."""
        try:
            manifest = self._read_manifest(name)
        except CacheError as exc:  # corrupt, foreign, or unreadable (CacheIOError)
            return [str(exc)]
        return None if manifest is None else self._file_problems(name, manifest, hashes)

    def _file_problems(self, name: str, manifest: dict, hashes: bool) -> list[str]:
        entry, found = self._entry_dir(name), []
        for rel, record in sorted(manifest["files"].items()):
            problem = self._file_problem(f"{entry}/{rel}", record, hashes)
            if problem:
                found.append(f"{name}/{rel}: {problem}")
        return found

    def add_files(self, name: str, files: dict[str, dict[str, torch.Tensor]], extra_update: dict) -> dict:
        """Add files (e.g. LoRA factors for another rank) to an existing entry and deep-merge `extra_update` into
        its manifest, under the entry's lock. Files are write-once: one already in the entry is a ValueError.
        Returns the new manifest. On a failure (a full disk) the files written so far are removed again."""
        check_name(name, "entry name")
        _check_extra(extra_update)
        for file in files:
            _check_file_name(file)
        with self.lock(name):
            manifest = self.show(name)
            build_id = manifest["build_id"]
            clash = sorted(f for f in files if f"{build_id}/{f}" in manifest["files"])
            if clash:
                raise ValueError(f"entry {name} already has {clash}; entry files are write-once")
            folder = f"{self._entry_dir(name)}/{build_id}"
            records: dict[str, dict] = {}
            try:
                for file, tensors in files.items():
                    records[f"{build_id}/{file}"] = self._write_tensors(f"{folder}/{file}", tensors, None)
                manifest = self.show(name)  # re-read: on S3 another host may have changed it meanwhile
                manifest["files"].update(records)
                _deep_merge(manifest, extra_update)
                self._write_manifest(name, manifest)
            except BaseException:
                for rel in records:  # no manifest names them: nothing half-added stays behind
                    with contextlib.suppress(CacheError):
                        self._remove(f"{self._entry_dir(name)}/{rel}")
                raise
            return manifest

    def ls(self) -> list[dict]:
        """One summary per entry that has a manifest, broken and foreign ones included: name, status ('ok',
        'broken' or 'foreign'), problem (the first one; None when ok), bytes, files, created, build_id, key (None
        where the manifest cannot be read). File sizes are checked, not hashes (verify does that)."""
        return [s for s in (self._summary(name) for name in self._entry_names()) if s is not None]

    def _summary(self, name: str) -> dict | None:
        summary = {"name": name, "status": "ok", "problem": None, "bytes": None, "files": None, "created": None,
                   "build_id": None, "key": None}
        try:
            manifest = self._read_manifest(name)
        except CacheError as exc:  # corrupt, foreign, or unreadable (CacheIOError)
            return {**summary, "status": "foreign" if isinstance(exc, CacheForeignError) else "broken",
                    "problem": str(exc)}
        if manifest is None:
            return None  # never published: it does not exist (gc removes it)
        problems = self._file_problems(name, manifest, hashes=False)
        return {**summary, "status": "broken" if problems else "ok", "problem": problems[0] if problems else None,
                "bytes": sum(r["bytes"] for r in manifest["files"].values()), "files": len(manifest["files"]),
                "created": manifest.get("created"), "build_id": manifest["build_id"], "key": manifest["key"]}

    def verify(self, name: str | None = None) -> list[str]:
        """Problems of entry `name` (every entry when None), sizes and sha256, e.g. '<entry>/<build_id>/<file>:
        sha256 mismatch'; [] when clean. Foreign entries are reported. Entries without a manifest do not exist
        and are not checked (gc removes them); a `name` without one is a CacheMissError."""
        if name is None:
            return [p for entry in self._entry_names() for p in self._problems(entry, hashes=True) or []]
        found = self._problems(check_name(name, "entry name"), hashes=True)
        if found is None:
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        return found

    def unpublish(self, name: str) -> None:
        """Remove only the manifest of entry `name`: readers then see a miss and a rebuild's commit publishes (how
        a broken entry is repaired, under its lock). Its files stay until gc. No error if there is none."""
        self._remove(f"{self._entry_dir(name)}/{MANIFEST}")

    def rm(self, name: str) -> str:
        """Remove entry `name` (with or without a manifest); CacheMissError if there is nothing to remove.

        A foreign entry whose directory is a link loses only the link, never what it points to. Returns 'link'
        then, else 'entry'."""
        entry = self._entry_dir(name)
        if self.is_local and os.path.islink(entry):
            self._remove(entry)
            return "link"
        self._refuse_links(entry)  # a link further up (bases/ itself): nothing behind it is ours to delete
        if not self.fs.exists(entry):
            raise CacheMissError(f"no entry {name!r} in {self.uri}")
        self.unpublish(name)  # first: readers then see a miss, never a half-removed entry
        self._remove(entry)
        return "entry"

    def gc(self, grace_seconds: float = GC_GRACE_SECONDS) -> list[str]:
        """Remove what no manifest references and nothing touched for `grace_seconds`: build folders of crashed or
        lost builds, entries without a manifest, stale temporary files, and stale `models/*.tmp-*` folders of
        tiny models. Entries whose lock is held (a build is running), entries with an unreadable manifest and
        foreign entries are left alone. Returns what was removed."""
        cutoff = time.time() - grace_seconds
        removed: list[str] = []
        for name in self._entry_names():
            try:
                with self.lock(name, timeout=0):
                    removed += self._gc_entry(name, cutoff)
            except CacheLockTimeoutError:
                continue
        return removed + self._gc_models(cutoff)

    def _gc_entry(self, name: str, cutoff: float) -> list[str]:
        entry = self._entry_dir(name)
        try:
            manifest = self._read_manifest(name)
        except CacheCorruptError:
            return []  # never delete what we cannot read, nor what is foreign: verify reports it, rm removes it
        if manifest is None:  # never published: remove it whole once nothing in it is recent
            if self._newest(entry) > cutoff:
                return []
            self._remove(entry)
            return [f"{name}/"]
        listed = set(manifest["files"])
        referenced = {rel.split("/")[0] for rel in listed} | {manifest["build_id"]}
        removed = []
        for child in self.fs.ls(entry, detail=True):
            path = child["name"].rstrip("/")
            base = posixpath.basename(path)
            if base == MANIFEST or child.get("islink"):  # a link was not written by the cache: left alone
                continue
            if base not in referenced:  # a crashed or lost build, or a stale temporary manifest
                if self._newest(path) <= cutoff:
                    self._remove(path)
                    removed.append(f"{name}/{base}")
                continue
            for file_path, info in self.fs.find(path, detail=True).items():  # a published build folder:
                rel = f"{base}/{file_path[len(path):].strip('/')}"  # only files a crashed add_files left behind
                mtime = _mtime(info)
                if rel not in listed and mtime is not None and mtime <= cutoff and self._link_in(file_path) is None:
                    self._remove(file_path)
                    removed.append(f"{name}/{rel}")
        return removed

    def _gc_models(self, cutoff: float) -> list[str]:
        """Stale `<root>/models/*.tmp-*` folders: what a crashed or failed (full disk) tiny-model write left."""
        folder = f"{self.root}/models"
        if not self.is_local or self._link_in(folder) is not None:
            return []
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return []
        removed = []
        for name in names:
            path = os.path.join(folder, name)
            if fnmatch.fnmatchcase(name, "*.tmp-*") and not os.path.islink(path) and self._newest(path) <= cutoff:
                self._remove(path)
                removed.append(f"models/{name}")
        return removed


# ----------------------------------------------------------------------------------------------- writer


class EntryWriter:
    """Writes one build of an entry into its own build folder; commit() publishes it by writing the manifest last.

    As a context manager, leaving the block without commit() (an exception, or a forgotten commit) aborts the build.
    """

    def __init__(self, cache: BaseCache, key: BaseCacheKey) -> None:
        self.cache = cache
        self.key = key
        self.name = key.name
        self.build_id = _new_build_id()
        self.folder = f"{cache._entry_dir(self.name)}/{self.build_id}"
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
        rel = self._new_rel(_check_file_name(file))
        self.files[rel] = self.cache._write_tensors(f"{self.folder}/{file}", tensors, metadata)

    def add_json(self, file: str, data: bytes) -> None:
        """Save `data`, the bytes of a JSON document, as `<build folder>/<file>` (a relative .json path such as
        'tokenizer/tokenizer.json') and record its sha256 and size. ValueError if `data` is not JSON."""
        self._check_open()
        rel = self._new_rel(_check_file_name(file, ".json"))
        try:
            json.loads(data)  # the cache holds safetensors and JSON only
        except ValueError as exc:
            raise ValueError(f"file {file!r}: not a JSON document ({exc})") from None
        self.cache._write_bytes(f"{self.folder}/{file}", data)
        self.files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

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
        extra = _check_extra({} if extra is None else extra)
        try:
            existing = self.cache._read_manifest(self.name)
        except CacheForeignError:
            raise  # never publish through a link
        except CacheCorruptError:
            existing = None  # a broken manifest is replaced by this build
        if existing is not None:
            self.abort()
            return existing
        for rel, record in self.files.items():  # a gc during a very long unlocked build could have removed them
            if not self.cache._has_size(f"{self.folder}/{rel.split('/', 1)[1]}", record["bytes"]):
                raise CacheError(f"entry {self.name}: build {self.build_id} lost {rel} before commit; nothing was "
                                 "published")
        manifest = {**copy.deepcopy(extra), "format_version": FORMAT_VERSION, "name": self.name,
                    "key": self.key.fields(), "build_id": self.build_id, "files": dict(self.files),
                    "created": _now_iso()}
        self.cache._write_manifest(self.name, manifest)
        self.state = "committed"
        return manifest

    def abort(self) -> None:
        """Remove this build's folder. A no-op after commit()."""
        if self.state == "committed":
            return
        self.state = "aborted"
        if self.cache._link_in(self.folder) is None:  # behind a link nothing was written, nothing is ours
            self.cache._remove(self.folder)

    def _check_open(self) -> None:
        if self.state != "open":
            raise CacheError(f"entry {self.name}: build {self.build_id} is already {self.state}")
