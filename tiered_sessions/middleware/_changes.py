"""What a request changed in its session's data: each top-level key as loaded, kept as canonical JSON, against
the keys as they are when the response starts.

Rules: a key counts as changed when its JSON differs (so in-place edits of nested values count, and writing
back an equal value does not); a value that is not JSON counts as changed, so the write that follows raises
``InvalidSessionData`` with the details. Keys are top-level names without dots, because
``manager.update(set=...)`` reads dots as paths.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ..errors import InvalidSessionData


class Baseline:
    """The data a request loaded, to copy for the handler and to compare with when the response starts."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._raw = {key: _dump(value) for key, value in data.items()}

    def copy(self) -> dict[str, Any]:
        """A deep copy of the loaded data (the manager hands every request of a process the same object)."""
        return {key: orjson.loads(raw) for key, raw in self._raw.items()}

    def changes(self, current: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """(keys set to a new value, keys deleted) of ``current`` against what was loaded."""
        changed = {key: value for key, value in current.items() if not _unchanged(self._raw.get(key), value)}
        return changed, [key for key in self._raw if key not in current]


def check_key(key: object) -> None:
    if not isinstance(key, str) or not key or "." in key:
        raise InvalidSessionData(f"session keys are non-empty strings without dots, got {key!r}")


def _dump(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def _unchanged(baseline: bytes | None, value: Any) -> bool:
    if baseline is None:
        return False
    try:
        return baseline == _dump(value)
    except orjson.JSONEncodeError:
        return False
