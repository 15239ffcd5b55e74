"""Garbage collection: what no manifest references and nothing touched for a grace period."""

from __future__ import annotations

import fnmatch
import time

from orchestrator.cache.errors import CacheCorruptError, CacheLockTimeoutError
from orchestrator.cache.manifest import MANIFEST, entry_dir, entry_names, read_manifest
from orchestrator.cache.store import Store

GC_GRACE_SECONDS = 3600.0
MODELS = "models"  # built-in tiny models (workers.model_source) are materialized here, beside a local cache


def collect(store: Store, grace_seconds: float) -> list[str]:
    """Remove what no manifest references and nothing touched for `grace_seconds` (see BaseCache.gc); return
    what was removed, as '<name>/', '<name>/<build_id>', '<name>/<build_id>/<file>' or 'models/<folder>'."""
    cutoff = time.time() - grace_seconds
    removed: list[str] = []
    for name in entry_names(store):
        try:
            with store.lock(name, 0):
                removed += _collect_entry(store, name, cutoff)
        except CacheLockTimeoutError:  # a build is running
            continue
    return removed + _collect_models(store, cutoff)


def _collect_entry(store: Store, name: str, cutoff: float) -> list[str]:
    entry = entry_dir(name)
    try:
        manifest = read_manifest(store, name)
    except CacheCorruptError:
        return []  # never delete what we cannot read, nor what is foreign: verify reports it, rm removes it
    if manifest is None:  # never published: remove it whole once nothing in it is recent
        if store.newest(entry) > cutoff:
            return []
        store.remove(entry)
        return [f"{name}/"]
    listed = set(manifest["files"])
    referenced = {rel.split("/")[0] for rel in listed} | {manifest["build_id"]}
    removed = []
    for child in store.children(entry):
        if child.name == MANIFEST or child.is_link:  # a link was not written by the cache: left alone
            continue
        if child.name not in referenced:  # a crashed or lost build, or a stale temporary manifest
            if store.newest(f"{entry}/{child.name}") <= cutoff:
                store.remove(f"{entry}/{child.name}")
                removed.append(f"{name}/{child.name}")
            continue
        removed += _collect_unlisted(store, name, child.name, listed, cutoff)
    return removed


def _collect_unlisted(store: Store, name: str, build: str, listed: set[str], cutoff: float) -> list[str]:
    """In a published build folder: only the files a crashed add_files left behind, never behind a link."""
    folder, removed = f"{entry_dir(name)}/{build}", []
    for file, mtime in store.files(folder).items():
        rel = f"{build}/{file}"
        if rel not in listed and mtime is not None and mtime <= cutoff and store.link_in(f"{folder}/{file}") is None:
            store.remove(f"{folder}/{file}")
            removed.append(f"{name}/{rel}")
    return removed


def _collect_models(store: Store, cutoff: float) -> list[str]:
    """Stale `<root>/models/*.tmp-*` folders: what a crashed or failed (full disk) tiny-model write left.
    An S3 cache has no models/ (tiny models are materialized locally): nothing is listed there."""
    if store.link_in(MODELS) is not None:
        return []
    try:
        children = sorted(store.children(MODELS), key=lambda child: child.name)
    except FileNotFoundError:
        return []
    removed = []
    for child in children:
        path = f"{MODELS}/{child.name}"
        if fnmatch.fnmatchcase(child.name, "*.tmp-*") and not child.is_link and store.newest(path) <= cutoff:
            store.remove(path)
            removed.append(path)
    return removed
