"""How an error message echoes user input, shared by every input check (workers' and the orchestrator's):
`brief` (how an error echoes a user value), `clip` (the cap on any line of a message) and `name_problem` (the
rule for a name that becomes a path). Standard library only."""

from __future__ import annotations

import re

BRIEF_CHARS = 80  # how much of a user value an error echoes
LINE_CHARS = 500  # the most any one problem line says (the safety net behind `brief`)
SHOWN_PROBLEMS = 25  # the most problems one message lists; the rest are counted
MAX_NAME = 100
SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}")


def clip(text: str, limit: int = LINE_CHARS) -> str:
    """`text` on one line, cut to `limit` characters plus its length when longer."""
    if len(text) > limit:
        text = f"{text[:limit]}... ({len(text):,} characters)"
    return text.replace("\n", " ").replace("\r", " ")


def brief(value: object, limit: int = BRIEF_CHARS) -> str:
    """repr(value) cut to about `limit` characters, plus the value's length when it was cut.

    Bounded in time and memory whatever the value: a string is cut before its repr is built, and a container
    shows only its first items (a 50 MB string or a million-item list becomes one short line).
    """
    if isinstance(value, str | bytes):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}... ({len(value):,} {'characters' if isinstance(value, str) else 'bytes'})"
    if isinstance(value, list | tuple | dict | set | frozenset) and value:
        text = _container_repr(value, limit)
        return text if len(text) <= limit else f"{text[:limit]}... ({len(value):,} items)"
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _container_repr(value: list | tuple | dict | set | frozenset, limit: int) -> str:
    """The repr of a container's first items (each itself brief): enough to pass `limit`, never all of them."""
    items = value.items() if isinstance(value, dict) else value
    parts, used = [], 0
    for item in items:
        part = f"{brief(item[0], limit)}: {brief(item[1], limit)}" if isinstance(value, dict) else brief(item, limit)
        parts.append(part)
        used += len(part) + 2
        if used > limit:
            break
    open_, close = {list: "[]", tuple: "()"}.get(type(value), "{}")
    more = ", ..." if len(parts) < len(value) else "," if isinstance(value, tuple) and len(value) == 1 else ""
    return f"{open_}{', '.join(parts)}{more}{close}"


def name_problem(value: str, what: str) -> str | None:
    """None when `value` is safe as one path component; else the problem, for a message 'field: problem'.

    Every name that becomes a path (the spec's name, task names) follows this one rule: letters, digits, '.',
    '_' and '-', starting with a letter or digit, at most MAX_NAME characters. So no '/', no '..', no leading
    '.' and no absolute path: joined to a directory, the name stays inside it. `what` says what it names.
    """
    if SAFE_NAME.fullmatch(value):
        return None
    return (f"expected letters, digits, '.', '_' or '-' ({what}; starting with a letter or digit, at most "
            f"{MAX_NAME} characters), got {brief(value)}")
