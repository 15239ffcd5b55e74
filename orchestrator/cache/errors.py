"""What the cache refuses: its exceptions, and the name checks that keep every path inside the cache root."""

from __future__ import annotations

import re


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


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
MAX_NAME = 200  # leaves room under the usual 255-byte file-name limit for the temporary-name prefix


def is_safe(part: object) -> bool:
    """Whether `part` is one plain path component: [A-Za-z0-9._-], no leading dot, no '..', short enough."""
    return (isinstance(part, str) and len(part) <= MAX_NAME and ".." not in part
            and _SAFE_NAME.fullmatch(part) is not None)


def is_int(value: object) -> bool:
    """Whether `value` is an int proper (JSON's true/false load as bools, which Python counts as ints)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_name(value: object, what: str = "name") -> str:
    """Return `value` if it is one plain path component (entry, build or file name); else raise ValueError."""
    if not is_safe(value):
        raise ValueError(f"{what} {value!r} is not a plain name ([A-Za-z0-9._-], at most {MAX_NAME} characters, "
                         "no '..', no '/'): it cannot escape the cache root")
    return value  # type: ignore[return-value]


def check_relpath(value: object, what: str = "file") -> str:
    """Return `value` if it is a relative path of plain names (e.g. '<build_id>/<file>'); else raise ValueError."""
    if not isinstance(value, str) or not all(is_safe(part) for part in value.split("/")):
        raise ValueError(f"{what} {value!r} is not a relative path of plain names ([A-Za-z0-9._-], no '..', "
                         "not absolute): it cannot escape the cache root")
    return value
