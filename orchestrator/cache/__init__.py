"""The content-addressed cache of quantized bases (DESIGN.md, "The cache of quantized bases").

Layout, the same on every store::

    <root>/bases/<name>/manifest.json                   written LAST: an entry without it does not exist
    <root>/bases/<name>/<build_id>/<file>.safetensors   one fresh folder per build attempt
    <root>/bases/<name>/<build_id>/config.json          the model's config (JSON files are recorded like shards)
    <root>/bases/<name>/<build_id>/tokenizer/*.json     the model's tokenizer, when it has one: an entry is
                                                        self-contained, a copied or moved cache still works
    <root>/locks/<name>.lock                            local store only
    <root>/models/<tiny model>                          built-in tiny models (workers.model_source); gc removes
                                                        their stale `*.tmp-*` folders

`<name>` is readable plus a hash of every field of the key (`BaseCacheKey.name`). A build writes its files into
its own build folder and only then writes the manifest that names them, so a crashed build leaves an unreferenced
folder (which `gc` removes) and two builders racing on one key cost duplicate work, never a corrupt entry.

An entry is *broken* when its manifest is unreadable or rejected, or a file is missing, truncated or fails its
sha256 (`problems`); it is *foreign* when a symbolic link sits anywhere below the cache root on the way to it
(the cache never writes links, and never follows one: it could lead out of the cache root). Foreign entries are
listed and reported, never read, written or garbage-collected; `rm` removes only the link.

The package, one job a module:
- `key`: `BaseCacheKey`, what an entry depends on, and its name;
- `errors`: the exceptions, and the checks that keep names inside the cache root;
- `store`: the `Store` protocol the entry logic talks to, with `local_store` (a directory, also an NFS mount:
  atomic renames, lock files, one file mode) and `s3_store` (s3fs: atomic PUTs, locks only inside the process);
- `manifest`: an entry's layout and manifest; `writer`: `EntryWriter`; `gc`: garbage collection;
- `entries`: `BaseCache`, the operations on entries (lookup, show, read, verify, add_files, ls, rm, gc).

Failures of the storage (read-only, full, no permission) are raised as `CacheIOError`, one line naming what failed,
the path and the OS reason. Only safetensors and JSON are ever stored or read back: no pickle, no torch.load.
"""

from orchestrator.cache.entries import DEFAULT_URI, LOCK_TIMEOUT_SECONDS, BaseCache, open_store, resolve_uri
from orchestrator.cache.errors import (
    CacheCorruptError,
    CacheError,
    CacheForeignError,
    CacheIOError,
    CacheLockTimeoutError,
    CacheMissError,
    check_name,
    check_relpath,
)
from orchestrator.cache.gc import GC_GRACE_SECONDS
from orchestrator.cache.key import FORMAT_VERSION, BaseCacheKey
from orchestrator.cache.local_store import file_mode
from orchestrator.cache.manifest import MANIFEST
from orchestrator.cache.store import Store
from orchestrator.cache.writer import EntryWriter

__all__ = [
    "DEFAULT_URI", "FORMAT_VERSION", "GC_GRACE_SECONDS", "LOCK_TIMEOUT_SECONDS", "MANIFEST", "BaseCache",
    "BaseCacheKey", "CacheCorruptError", "CacheError", "CacheForeignError", "CacheIOError", "CacheLockTimeoutError",
    "CacheMissError", "EntryWriter", "Store", "check_name", "check_relpath", "file_mode", "open_store",
    "resolve_uri",
]
