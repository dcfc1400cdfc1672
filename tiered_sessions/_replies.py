"""What the Lua scripts answer, by name. A script answers with its result or a status number, and the same
number means different things in different scripts (-1 is "over the limit" in ensure.lua, "gone" in the
others): the hot tier decodes each script's reply here, so no caller compares bare numbers.

``touch.lua`` is the exception kept for speed: its reply is the new version (> 0) or one of the shared
statuses (``MISSING``, ``GONE``, ``REPLAYED``), whose values are the numbers every script uses for them."""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

from ._codec import VERSION, pairs_to_dict


class Status(enum.IntEnum):
    DONE = 1  # written (the reply's value: the new version)
    # Shared by touch, update, remove and rotate: the script's own numbers.
    MISSING = 0  # not in Redis: read through from Postgres, then try again
    GONE = -1  # removed, closed or expired (remove: already a tombstone)
    REPLAYED = -3  # a journal replay this copy already holds
    # One script's each: decoded from its own number.
    EXISTING = 101  # ensure: the live session
    CREATED = 102  # ensure: a new one
    OVER_LIMIT = -101  # ensure: max_concurrent_sessions reached (value: the live sessions)
    TOO_LARGE = -102  # update: past max_session_bytes (value: the size it would have)
    GUARD_CHANGED = -104  # update: a nested field changed since it was read: read again, recompute
    VERSION_CONFLICT = -105  # update: not at the expected version (value: the version it is at)
    ID_TAKEN = -106  # rotate: the new id exists (draw another)


class Reply(NamedTuple):
    status: Status
    value: int = 0  # see Status
    fields: dict[bytes, bytes] | None = None  # the session's hash (ensure, rotate)


_ENSURE = {1: Status.EXISTING, 2: Status.CREATED, 0: Status.MISSING, -1: Status.OVER_LIMIT}
_UPDATE = {0: Status.MISSING, -1: Status.GONE, -3: Status.REPLAYED, -2: Status.TOO_LARGE,
           -4: Status.GUARD_CHANGED, -5: Status.VERSION_CONFLICT}
_REMOVE = {0: Status.MISSING, -1: Status.GONE, -3: Status.REPLAYED}
_ROTATE = {0: Status.MISSING, -1: Status.GONE, -2: Status.ID_TAKEN}


def _as_hash(reply: Any) -> dict[bytes, bytes]:
    return reply if isinstance(reply, dict) else pairs_to_dict(reply)  # RESP3 sends a map, RESP2 a list


def ensure(reply: list[Any]) -> Reply:
    """``{1|2, hash}`` existing or created, ``{0}`` miss, ``{-1, live}`` over the limit."""
    status = _ENSURE[int(reply[0])]
    if status in (Status.EXISTING, Status.CREATED):
        return Reply(status, fields=_as_hash(reply[1]))
    return Reply(status, int(reply[1]) if len(reply) > 1 else 0)


def update(reply: int | list[Any]) -> Reply:
    """A status number, ``{-2, size}``, ``{-4}``, ``{-5, version}``, or ``{version, size}`` when written."""
    if isinstance(reply, int):
        return Reply(_UPDATE[reply])
    code = int(reply[0])
    if code > 0:
        return Reply(Status.DONE, code)
    return Reply(_UPDATE[code], int(reply[1]) if len(reply) > 1 else 0)


def remove(reply: int) -> Reply:
    """A status number, or the tombstone's version."""
    return Reply(Status.DONE, reply) if reply > 0 else Reply(_REMOVE[reply])


def rotate(reply: int | Any) -> Reply:
    """A status number, or the new id's hash."""
    if isinstance(reply, int):
        return Reply(_ROTATE[reply])
    fields = _as_hash(reply)
    return Reply(Status.DONE, int(fields.get(VERSION, 0)), fields)
