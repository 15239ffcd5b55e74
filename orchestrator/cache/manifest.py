"""An entry's layout in a store and its manifest: where an entry lives, what its manifest must say, reading and
writing it, and checking the files it names.

    bases/<name>/manifest.json                  written last: an entry without it does not exist
    bases/<name>/<build_id>/<file>              the files of one build (.safetensors and .json only)
"""

from __future__ import annotations

import copy
import json
import uuid
from datetime import UTC, datetime

from orchestrator.cache.errors import CacheCorruptError, check_name, check_relpath, is_int, is_safe
from orchestrator.cache.store import Store, file_problem

MANIFEST = "manifest.json"
EXTENSIONS = (".safetensors", ".json")  # the only files an entry holds: nothing else is ever read back
RESERVED = ("format_version", "name", "key", "build_id", "files", "created")  # manifest fields the cache writes


def entry_dir(name: str) -> str:
    """The folder of entry `name`, relative to the cache root."""
    return f"bases/{check_name(name, 'entry name')}"


def entry_names(store: Store) -> list[str]:
    """The names under bases/ that can be entries, sorted; links among them too (they are listed as foreign)."""
    try:
        children = store.children("bases")
    except FileNotFoundError:
        return []
    # a linked entry is listed too (as foreign): hiding it would hide what show / rm would act on
    names = (child.name for child in children if child.is_dir or child.is_link)
    return sorted(n for n in names if is_safe(n))  # anything else was not written by this cache


def read_manifest(store: Store, name: str) -> dict | None:
    """The checked manifest of entry `name`, None when it has none. CacheCorruptError when it is unreadable or
    rejected, CacheForeignError when a link sits on the way to it or to a file it names."""
    entry = entry_dir(name)
    rel = f"{entry}/{MANIFEST}"
    store.refuse_links(rel)  # also the entry directory: never read a manifest from outside the cache
    try:
        raw = store.read_bytes(rel)
    except FileNotFoundError:
        return None
    try:
        manifest = check_manifest(json.loads(raw), name)
    except ValueError as exc:  # also json.JSONDecodeError and UnicodeDecodeError
        kind = "not valid JSON" if isinstance(exc, json.JSONDecodeError | UnicodeDecodeError) else "rejected"
        raise CacheCorruptError(f"entry {name}: manifest {store.where(rel)} {kind}: {exc}") from None
    for file in manifest["files"]:
        store.refuse_links(f"{entry}/{file}")
    return manifest


def write_manifest(store: Store, name: str, manifest: dict) -> None:
    """Publish `manifest` as entry `name`'s manifest (one atomic write)."""
    store.write_bytes(f"{entry_dir(name)}/{MANIFEST}", json.dumps(manifest, indent=1).encode())


def file_problems(store: Store, name: str, manifest: dict, hashes: bool) -> list[str]:
    """'<name>/<file>: <problem>' for each file of the manifest that is missing, of the wrong size or (with
    `hashes`) the wrong sha256."""
    entry, found = entry_dir(name), []
    for rel, record in sorted(manifest["files"].items()):
        problem = file_problem(store, f"{entry}/{rel}", record, hashes)
        if problem:
            found.append(f"{name}/{rel}: {problem}")
    return found


def check_manifest(manifest: object, name: str) -> dict:
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
        if not rel.endswith(EXTENSIONS):
            raise ValueError(f"file {rel!r}: entries hold only {' and '.join(EXTENSIONS)} files")
        if not (isinstance(record, dict) and isinstance(record.get("sha256"), str) and is_int(record.get("bytes"))):
            raise ValueError(f"file {rel!r}: expected a record with 'sha256' and 'bytes'")
    return manifest


def check_extra(extra: object) -> dict:
    """`extra` if it is a dict of manifest fields the cache does not write itself; else ValueError."""
    if not isinstance(extra, dict):
        raise ValueError(f"extra: expected a dict, got {type(extra).__name__}")
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"extra: {clash} are written by the cache itself and cannot be set")
    return extra


def check_file_name(file: object, extension: str = ".safetensors") -> str:
    """`file` if it is a relative path of plain names ending in `extension` ('.safetensors' or '.json')."""
    if extension == ".safetensors":
        check_name(file, "file name")  # tensor files sit directly in the build folder
    else:
        check_relpath(file, "file name")
    if not file.endswith(extension):  # type: ignore[union-attr]
        raise ValueError(f"file name {file!r}: expected a {extension} file (entries hold only safetensors and JSON)")
    return file  # type: ignore[return-value]


def deep_merge(target: dict, update: dict) -> None:
    """Merge `update` into `target` in place, dicts key by key, anything else replaced by a copy."""
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(target.get(k), dict):
            deep_merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def new_build_id() -> str:
    """A fresh build folder name: UTC time, then randomness (two builders never share one)."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}Z-{uuid.uuid4().hex[:16]}"


def now_iso() -> str:
    """Now in UTC, to the second, as the manifest's 'created'."""
    return datetime.now(UTC).isoformat(timespec="seconds")
