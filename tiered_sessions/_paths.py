"""Field-level edits of a session's data: ``set={"cart.items": [...]}`` and ``unset=["cart.coupon"]``.

A top-level key is its own Redis hash field, so setting or deleting one is atomic in the update script.
A dotted path changes part of one top-level value: the caller reads that value, applies the edit, and writes
it back guarded by the value it read (the script refuses if it changed meanwhile, and the caller retries),
so two requests editing different keys, nested or not, both survive.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import orjson

from ._codec import DATA_PREFIX, check_json
from .errors import InvalidSessionData


@dataclasses.dataclass(frozen=True, slots=True)
class Edits:
    top_set: dict[str, Any]
    top_unset: list[str]
    nested_set: list[tuple[list[str], Any]]
    nested_unset: list[list[str]]

    @property
    def roots(self) -> list[str]:
        """Top-level keys whose current value the nested edits need."""
        seen = dict.fromkeys(path[0] for path, _ in self.nested_set)
        seen.update(dict.fromkeys(path[0] for path in self.nested_unset))
        return list(seen)

    def __bool__(self) -> bool:
        return bool(self.top_set or self.top_unset or self.nested_set or self.nested_unset)


def _split(path: object, what: str) -> list[str]:
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidSessionData(f"{what}: a path must be a non-empty string without NUL, got {path!r}")
    parts = path.split(".")
    if any(part == "" for part in parts):
        raise InvalidSessionData(f"{what}: empty segment in path {path!r}")
    return parts


def plan(set_: Mapping[str, Any] | None, unset: Iterable[str] | None) -> Edits:
    """Validate and sort the edits; refuses a key that is both set and unset, or edited at two depths."""
    if set_ is not None and not isinstance(set_, Mapping):
        raise InvalidSessionData(f"set must be a mapping of paths to values, got {type(set_).__name__}")
    if unset is not None and (isinstance(unset, str | bytes) or not isinstance(unset, Iterable)):
        raise InvalidSessionData("unset must be a list of paths")
    edits = Edits({}, [], [], [])
    for path, value in (set_ or {}).items():
        parts = _split(path, "set")
        check_json(value, f"set.{path}")
        if len(parts) == 1:
            edits.top_set[parts[0]] = value
        else:
            edits.nested_set.append((parts, value))
    for path in unset or ():
        parts = _split(path, "unset")
        if len(parts) == 1:
            edits.top_unset.append(parts[0])
        else:
            edits.nested_unset.append(parts)
    whole = set(edits.top_set) | set(edits.top_unset)
    if len(whole) < len(edits.top_set) + len(edits.top_unset) or whole & set(edits.roots):
        raise InvalidSessionData("a key may be set, unset or edited inside once per call, not twice")
    return edits


def apply(edits: Edits, current: Mapping[str, bytes | None]) -> dict[str, Any]:
    """New values of the nested edits' roots, from their current stored JSON (None: absent)."""
    values: dict[str, Any] = {root: None if current.get(root) is None else orjson.loads(current[root] or b"null")
                              for root in edits.roots}
    for parts, value in edits.nested_set:
        if values[parts[0]] is None:
            values[parts[0]] = {}
        node = values[parts[0]]
        for depth, part in enumerate(parts[1:-1], start=1):
            if not isinstance(node, dict):
                raise InvalidSessionData(f"set: {'.'.join(parts[:depth])} is not an object")
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise InvalidSessionData(f"set: {'.'.join(parts[:-1])} is not an object")
        node[parts[-1]] = copy.deepcopy(value)
    for parts in edits.nested_unset:
        node = values[parts[0]]
        for part in parts[1:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return {root: value for root, value in values.items() if value is not None}


def apply_locally(data: dict[str, Any], edits: Edits, roots: Mapping[str, Any]) -> None:
    """Mirror an applied edit on the caller's in-process Session."""
    data.update(copy.deepcopy(edits.top_set))
    for key in edits.top_unset:
        data.pop(key, None)
    data.update(copy.deepcopy(roots))


def field(key: str) -> bytes:
    return (DATA_PREFIX + key).encode()
