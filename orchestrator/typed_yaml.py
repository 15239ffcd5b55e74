"""Typed YAML, generically: read a YAML file within bounds, build frozen dataclasses from it, override it
with `--set` paths, and make its local paths absolute. Nothing here knows a job spec's keys (orchestrator/spec.py
does); every problem is a `Problem` (its dotted path and what is wrong), collected rather than raised, so that a
spec's problems are all reported at once.

Reading is bounded whatever the input: the file's size, UTF-8, YAML depth and alias expansion are checked
before anything walks the data, and an error echoes a user value only briefly (`orchestrator.errors.brief`).

The path language (`--set`, `Problem.path`): dotted keys, a list item by its index, `tasks[0].max_length` or
`tasks.0.max_length`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from collections.abc import Callable
from typing import Any

import yaml

from orchestrator.errors import Problem, SpecError
from workers.messages import brief, clip

MAX_SPEC_BYTES = 16 * 1024 * 1024  # a spec is a few KB; this bounds the time and memory of reading one
MAX_YAML_DEPTH = 50  # real specs nest 5 levels; Python's stack (and every recursive walk of the data) is safe
MAX_YAML_VALUES = 100_000  # nodes once aliases are expanded: far above any spec, far below a billion laughs
URI_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


# ---------------------------------------------------------------------------------------------- reading


class _YAMLLimitError(Exception):
    """The YAML is valid but refused (too deep, too big, a value that cannot be built); says where."""

    def __init__(self, problem: str, mark: Any):
        super().__init__(f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that measures what it composes, so that no YAML can exhaust the stack or memory.

    Each node's size and height count its aliases expanded (an alias is a reference, but whatever later walks,
    copies or prints the data walks it whole): a billion-laughs file, or one nesting 1,000 levels deep, is
    refused while being composed, before anything expands it. A value that cannot be built (a 5,000-digit
    int, the date 2024-13-45) is refused with its position instead of raising from inside the constructor.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth, self._values = 0, 0
        self._measured: dict[int, tuple[int, int]] = {}  # id(node) -> (size, height), aliases expanded

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            if id(node) not in self._measured:  # the alias sits inside its own anchor: infinitely deep data
                raise _YAMLLimitError(f"the alias *{clip(event.anchor, 80)} refers to a node that contains it",
                                      event.start_mark)
            self._grow(*self._measured[id(node)], event.start_mark)
            return node
        self._grow(1, 1, event.start_mark)
        self._depth += 1
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        children = node.value if isinstance(node, yaml.SequenceNode) else \
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
        measured = [self._measured[id(child)] for child in children]
        self._measured[id(node)] = (1 + sum(m[0] for m in measured), 1 + max((m[1] for m in measured), default=0))
        return node

    def _grow(self, size: int, height: int, mark: Any) -> None:
        self._values += size
        if self._values > MAX_YAML_VALUES:
            raise _YAMLLimitError(f"the YAML holds more than {MAX_YAML_VALUES:,} values, counting each alias "
                                  f"expanded (the limit is {MAX_YAML_VALUES:,}; a job spec needs far fewer)", mark)
        if self._depth + height > MAX_YAML_DEPTH:
            raise _YAMLLimitError(f"the YAML nests too deeply (more than {MAX_YAML_DEPTH} levels, counting "
                                  f"each alias expanded)", mark)

    def construct_object(self, node: Any, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # from int() / date(): not a YAMLError, so no position
            raise _YAMLLimitError(f"cannot read the value {brief(node.value)}: {exc}", node.start_mark) from None


def load_yaml(text: str) -> Any:
    """YAML text -> data, safely: only plain types, bounded depth, size and alias expansion.

    Raises ValueError with a one-line message (naming the line and column where known) for anything refused.
    """
    loader = None
    try:
        loader = _BoundedLoader(text)  # the reader checks every character here
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:  # its str() spans lines; say it in one
        char = f"#x{exc.character:04x}" if isinstance(exc.character, int) else brief(exc.character)
        raise ValueError(f"character {char} at offset {exc.position}: {exc.reason}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(exc, "problem", None) or getattr(exc, "context", None) or exc
        raise ValueError(f"YAML syntax error at {where}: {clip(str(problem), 200)}") from None
    except _YAMLLimitError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:  # a safety net: the depth limit should come first
        raise ValueError("the YAML nests too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    """YAML text -> data; anything `load_yaml` refuses, or text over MAX_SPEC_BYTES, is a SpecError headed by
    `source` that names the line and column where known."""
    if len(text) > MAX_SPEC_BYTES:
        raise SpecError([f"the spec is {len(text):,} characters; at most {MAX_SPEC_BYTES:,} are read"], source)
    try:
        return load_yaml(text)
    except ValueError as exc:
        raise SpecError([str(exc)], source) from None


def read_yaml_file(path: str, source: str) -> Any:
    """The data of a YAML file, not validated. Raises SpecError headed by `source` for a file that cannot be
    read, is over MAX_SPEC_BYTES, is not UTF-8 (the byte offset and line are named) or not YAML (`parse_yaml`)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # never more: a huge file (or /dev/zero) is refused unread
            size = max(os.fstat(f.fileno()).st_size, len(raw))
    except OSError as exc:
        raise SpecError([f"cannot read {clip(path, 200)}: {exc.strerror or exc}"], source) from None
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError([f"the file is {size:,} bytes; a spec may be at most {MAX_SPEC_BYTES:,} bytes "
                         f"({MAX_SPEC_BYTES // 2**20} MiB)"], source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise SpecError([f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} (line {line}) "
                         f"cannot be decoded; save the file as UTF-8"], source) from None
    return parse_yaml(text, source)


# ----------------------------------------------------------------------------------------- typed building


def build_typed(cls: Any, data: Any, path: str, problems: list[Problem]) -> Any:
    """Build dataclass `cls` from a YAML mapping, appending a problem for every unknown key or wrong type.

    A key `cls` once had is explained by its `MOVED_KEYS` (a ClassVar: key -> where that setting lives now).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append(Problem(path, f"expected a mapping with keys {field_names(cls)}, got {type_name(data)}"))
        return cls()
    hints, moved = typing.get_type_hints(cls), getattr(cls, "MOVED_KEYS", {})
    kwargs = {}
    for key, value in data.items():
        if key not in field_names(cls):
            where = f"{path}.{clip(str(key), 80)}"
            problems.append(Problem(where, moved[key] if key in moved else
                                    f"unknown key; valid keys: {field_names(cls)}"))
            continue
        converted = convert(hints[key], value, f"{path}.{key}", problems)
        if converted is not INVALID:
            kwargs[key] = converted
    return cls(**kwargs)


INVALID = object()  # what `convert` returns for a value it reported


def convert(hint: Any, value: Any, path: str, problems: list[Problem]) -> Any:
    """`value` as type `hint` (scalars, Optional, list[...], dict, dataclasses), else INVALID and a problem."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return convert(inner[0], value, path, problems)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            problems.append(Problem(path, f"expected a mapping, got {type_name(value)}"))
            return INVALID
        return value
    if origin is list:
        if not isinstance(value, list):
            problems.append(Problem(path, f"expected a list, got {type_name(value)}"))
            return INVALID
        items = [convert(args[0], v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        return INVALID if any(i is INVALID for i in items) else items
    if dataclasses.is_dataclass(hint):
        return build_typed(hint, value, path, problems)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        problems.append(Problem(path, f"expected {hint.__name__}, got {type_name(value)} {brief(value)}"))
        return INVALID
    return value


def field_names(cls: Any) -> list[str]:
    """The YAML keys of dataclass `cls`, sorted."""
    return sorted(f.name for f in dataclasses.fields(cls))


def type_name(value: Any) -> str:
    """How a YAML value's type is named in a message: 'null' for None, else the Python type's name."""
    return "null" if value is None else type(value).__name__


# ------------------------------------------------------------------------------------ the path language


def path_parts(path: str) -> list[str]:
    """'tasks[0].max_length' (or 'tasks.0.max_length') -> ['tasks', '0', 'max_length']."""
    return re.sub(r"\[([0-9]+)\]", r".\1", path).split(".")


def value_at(data: Any, path: str) -> Any:
    """The value at a dotted `path` of YAML data, or None where the path does not lead to one."""
    node = data
    for part in path_parts(path):
        if isinstance(node, dict):
            node = node.get(part)
        elif isinstance(node, list) and re.fullmatch(r"[0-9]{1,9}", part) and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def apply_overrides(data: dict, overrides: list[str], problems: list[Problem]) -> dict:
    """`--set a.b=value` (value parsed as YAML, so `[2,4]`, `1e-4`, `true` work) into the raw mapping; a list
    item by its index: `--set tasks[0].max_length=64` (or `tasks.0.max_length`)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            problems.append(Problem(f"--set {brief(item)}", "expected KEY=VALUE, e.g. training.lr=1e-4"))
            continue
        try:
            value = load_yaml(raw) if raw else None
        except ValueError as exc:
            problems.append(Problem(f"--set {clip(key, 80)}", f"the value {brief(raw)} is not valid YAML ({exc})"))
            continue
        problem = set_path(data, key, value)
        if problem:
            problems.append(Problem(f"--set {clip(key, 80)}", problem))
    return data


def set_path(data: dict, key: str, value: Any) -> str | None:
    """Set `value` at the dotted `key` (missing mappings are created); the problem if the path does not fit."""
    parts = path_parts(key)
    node: Any = data
    for i, part in enumerate(parts):
        where, last = clip(".".join(parts[:i]), 80), i == len(parts) - 1
        if isinstance(node, list):
            # ASCII digits, and few of them: int() of a 5,000-digit string raises
            if not re.fullmatch(r"[0-9]{1,9}", part) or int(part) >= len(node):
                return (f"{where} is a list of {len(node)} item(s): expected an index 0-{len(node) - 1}, "
                        f"got {brief(part)}")
            part = int(part)
        elif not isinstance(node, dict):
            return f"{where} is not a mapping or a list"
        if last:
            node[part] = value
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            node = node[part]
    return None


# ------------------------------------------------------------------------------------------ local paths


def absolute_path(value: Any, *, expand_home: bool = True) -> Any:
    """A local path made absolute against the working directory; URIs (and non-strings) as they are; `~`
    expanded, or kept as it is when `expand_home` is False (for another machine, whose home it means)."""
    if not isinstance(value, str) or not value or URI_SCHEME.match(value):
        return value
    if value.startswith("~"):
        if not expand_home:
            return value
        value = os.path.expanduser(value)
    return os.path.abspath(value)


def absolute_paths(data: Any, paths: dict[str, Callable[[Any], bool]], *, expand_home: bool = True) -> Any:
    """Make the local paths at `paths` absolute against the working directory (`absolute_path`), in place.

    Each key is a path of the path language, `*` standing for every item of a list (`tasks.*.train_file`); its
    value says whether the value found there is a local path (a built-in name stays as it is). Only values
    given are touched: a missing one stays missing.
    """
    for path, is_local in paths.items():
        for node, key in _slots(data, path_parts(path)):
            if is_local(node[key]):
                node[key] = absolute_path(node[key], expand_home=expand_home)
    return data


def _slots(node: Any, parts: list[str]) -> list[tuple[dict, str]]:
    """(mapping, key) of every value at the path `parts` in `node` ('*': each item of a list)."""
    head, rest = parts[0], parts[1:]
    if not rest:
        return [(node, head)] if isinstance(node, dict) and head in node else []
    if head == "*":
        children = node if isinstance(node, list) else []
    else:
        children = [node[head]] if isinstance(node, dict) and head in node else []
    return [slot for child in children for slot in _slots(child, rest)]
