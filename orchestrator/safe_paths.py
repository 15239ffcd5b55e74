"""Names that become paths, and deletes that stay where loftune writes.

A name from a spec or a record (a task, a trial id, a folder under `best/`) is joined into a path, so it must
be one plain path component; a delete must never leave the directory loftune owns (the run directory, the
cache root), whatever links or names are planted inside it. Both rules live here, once.
"""

from __future__ import annotations

import os
import re
import shutil

COMPONENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def is_component(name: object) -> bool:
    """True for one plain path component: [A-Za-z0-9._-], starting with a letter or digit, at most 200 long."""
    return isinstance(name, str) and COMPONENT.fullmatch(name) is not None


def check_component(name: object, what: str) -> str:
    """`name` if it is one plain path component, else ValueError naming `what`."""
    if not is_component(name):
        raise ValueError(f"{what}: {str(name)[:80]!r} is not a plain name (letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit): it becomes a path")
    return name  # type: ignore[return-value]


def is_inside(path: str, root: str) -> bool:
    """True when `path`, with every link resolved, lies strictly inside `root` (also resolved)."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real != top and real.startswith(top.rstrip(os.sep) + os.sep)


def remove_tree(path: str, root: str) -> None:
    """Delete `path` (a folder or a file) if it exists, but only inside `root`: ValueError otherwise.

    A link is removed as a link, never followed: deleting `best/<task>` planted as a link to a user's folder
    removes the link alone.
    """
    if not os.path.lexists(path):
        return
    parent = os.path.dirname(os.path.abspath(path))
    if not (is_inside(parent, root) or os.path.realpath(parent) == os.path.realpath(root)):
        raise ValueError(f"refusing to delete {path}: it is not inside {root}")
    if os.path.islink(path) or not os.path.isdir(path):
        os.remove(path)
        return
    if not is_inside(path, root):
        raise ValueError(f"refusing to delete {path}: it resolves outside {root}")
    shutil.rmtree(path)
