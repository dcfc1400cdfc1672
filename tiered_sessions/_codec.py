"""Validation and the byte formats of a session: the Redis hash and the JSON that Postgres stores.

A session is a Redis hash. Fixed fields have short names; each top-level key of ``data`` is its own field
``d:<key>`` and each key of ``metadata`` is ``m:<key>``, holding that value's JSON. Merging a key is then an
HSET of one field (no read-modify-write, no JSON decoding in Lua), and the flusher's claim.lua assembles
the whole document for Postgres by concatenating the stored JSON values without parsing them.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

import orjson

from .errors import InvalidSessionData, InvalidSessionId
from .model import ACTIVE, CLOSED, REMOVED, ColdRecord, Session

MAX_ID_LENGTH: Final = 255
_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,255}")

# Hash field names (bytes, as redis-py returns them without decode_responses).
VERSION: Final = b"v"
STATE: Final = b"st"
CREATED: Final = b"c"
LAST_ACTIVITY: Final = b"la"
EXPIRES: Final = b"ex"
REQUESTS: Final = b"rc"
DURATION: Final = b"td"
SIZE: Final = b"sz"
FOLDED: Final = b"jv"  # newest Postgres version this copy includes (journal replay applies only newer ones)
# "1": Postgres holds this session whole as of its last ack, so while only touches follow, the flusher
# writes activity rows (claim.lua); set by ack.lua, removed by every other write (update, rotate, redirty).
KEPT: Final = b"k"
ATTRIBUTE_FIELDS: Final = {"user_id": b"u", "user_type": b"ut", "ip_address": b"ip", "user_agent": b"ua"}
_USER_ID, _USER_TYPE, _IP_ADDRESS, _USER_AGENT = ATTRIBUTE_FIELDS.values()
# Of the fields hash_from_row writes: those it gives as numbers, and those as text (the rest are bytes)
_NUMBER_FIELDS: Final = (VERSION, CREATED, LAST_ACTIVITY, EXPIRES, REQUESTS, DURATION, FOLDED, SIZE)
_TEXT_FIELDS: Final = (_USER_ID, _USER_TYPE, _IP_ADDRESS, _USER_AGENT)
DATA_PREFIX: Final = "d:"
META_PREFIX: Final = "m:"
_D, _M = DATA_PREFIX.encode()[0], META_PREFIX.encode()[0]  # as bytes[0] gives them: ints

# One-letter state codes in Redis; "removed" is the tombstone that the flusher persists.
STATE_CODES: Final = {ACTIVE: b"a", CLOSED: b"c", REMOVED: b"x"}
CODE_STATES: Final = {code: state for state, code in STATE_CODES.items()}


def validate_session_id(session_id: object) -> str:
    if not isinstance(session_id, str) or _ID_PATTERN.fullmatch(session_id) is None:
        shown = repr(session_id)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidSessionId(
            f"session id must be 1-{MAX_ID_LENGTH} characters of letters, digits and '-_.:', got {shown}"
        )
    return session_id


def validate_attribute(name: str, value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or "\x00" in value or len(value) > 1024:
        raise InvalidSessionData(f"{name} must be a string of at most 1024 characters without NUL")
    try:
        value.encode()
    except UnicodeEncodeError:
        raise InvalidSessionData(f"{name} is not valid UTF-8 (lone surrogates)") from None
    return value


def encode_attributes(**attributes: object) -> list[bytes | str]:
    """The given (not None) attributes as hash field/value pairs, validated."""
    pairs: list[bytes | str] = []
    for name, value in attributes.items():
        checked = validate_attribute(name, value)
        if checked is not None:
            pairs += (ATTRIBUTE_FIELDS[name], checked)
    return pairs


def is_live(state: bytes | None, expires: bytes | None, now_ms: int) -> bool:
    """From a session hash's state and expiry fields: a session that is not a tombstone and expires after now."""
    return state is not None and state != STATE_CODES[REMOVED] and expires is not None and int(expires) > now_ms


def partition_of(session_id: str, partitions: int) -> int:
    return zlib.crc32(session_id.encode()) % partitions


def check_json(value: object, path: str, depth: int = 0) -> None:
    """Refuse anything Postgres jsonb would reject or silently change (NaN, NUL, non-JSON types)."""
    if depth > 200:
        raise InvalidSessionData(f"{path}: nested deeper than 200 levels")
    if value is None or value is True or value is False:
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidSessionData(f"{path}: strings may not contain \\u0000 (jsonb refuses it)")
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise InvalidSessionData(f"{path}: integer out of the 64-bit range")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidSessionData(f"{path}: NaN and Infinity are not JSON")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            check_json(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidSessionData(f"{path}: object keys must be strings, got {type(key).__name__}")
            if "\x00" in key:
                raise InvalidSessionData(f"{path}: keys may not contain \\u0000")
            check_json(item, f"{path}.{key}", depth + 1)
        return
    raise InvalidSessionData(f"{path}: {type(value).__name__} is not a JSON type")


def encode_document(document: object, prefix: str, what: str) -> list[tuple[bytes, bytes]]:
    """A JSON object as ``(field, json)`` pairs for the hash, validated before anything is written."""
    if not isinstance(document, Mapping):
        raise InvalidSessionData(f"{what} must be a JSON object (a dict), got {type(document).__name__}")
    pairs: list[tuple[bytes, bytes]] = []
    for key, value in document.items():
        if not isinstance(key, str):
            raise InvalidSessionData(f"{what}: keys must be strings, got {type(key).__name__}")
        if "\x00" in key:
            raise InvalidSessionData(f"{what}: keys may not contain \\u0000")
        check_json(value, f"{what}.{key}")
        try:
            pairs.append(((prefix + key).encode(), orjson.dumps(value)))
        except (UnicodeEncodeError, orjson.JSONEncodeError) as exc:  # lone surrogates, nesting orjson refuses
            raise InvalidSessionData(f"{what}.{key}: cannot be stored as JSON: {exc}") from None
    return pairs


def split_document(document: Mapping[str, Any], prefix: str) -> list[tuple[bytes, bytes]]:
    """A document read back from Postgres (already valid jsonb) as hash fields."""
    return [((prefix + key).encode(), orjson.dumps(value)) for key, value in document.items()]


def ms(seconds: float) -> int:
    return int(seconds * 1000)


def now_ms() -> int:
    """Unix time in ms: the clock of every timestamp and expiry Redis and the flusher keep."""
    return int(time.time() * 1000)


def session_from_hash(session_id: str, fields: Mapping[bytes, bytes]) -> Session:
    data: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for key, value in fields.items():
        if key[1:2] == b":":  # d:<key> or m:<key>; no fixed field's name has a colon there
            first = key[0]
            if first == _D:
                data[key[2:].decode()] = orjson.loads(value)
            elif first == _M:
                metadata[key[2:].decode()] = orjson.loads(value)
    get = fields.get
    user_id, user_type, ip_address, user_agent = get(_USER_ID), get(_USER_TYPE), get(_IP_ADDRESS), get(_USER_AGENT)
    return Session(
        session_id=session_id,
        created_at=int(fields[CREATED]) / 1000,
        last_activity=int(fields[LAST_ACTIVITY]) / 1000,
        expires_at=int(fields[EXPIRES]) / 1000,
        state=CODE_STATES[get(STATE, b"a")],
        request_count=int(get(REQUESTS, 0)),
        total_duration_ms=int(get(DURATION, 0)),
        data=data,
        metadata=metadata,
        version=int(fields[VERSION]),
        user_id=None if user_id is None else user_id.decode(),
        user_type=None if user_type is None else user_type.decode(),
        ip_address=None if ip_address is None else ip_address.decode(),
        user_agent=None if user_agent is None else user_agent.decode(),
    )


def pairs_to_dict(flat: list[bytes]) -> dict[bytes, bytes]:
    """A flat ``[field, value, field, value, ...]`` Lua reply as a dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


def stored_size(pairs: list[tuple[bytes, bytes]]) -> int:
    """What the size limit counts: the data and metadata fields as stored (names and JSON values)."""
    return sum(len(field) + len(value) for field, value in pairs)


def flatten(pairs: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [item for pair in pairs for item in pair]


class WarmHash(NamedTuple):  # a tuple: recovery builds one per row
    """A live row from Postgres as warm.lua and warm_page.lua take it: hash field/value pairs, its expiry in ms
    and its state code (also among the pairs)."""

    pairs: list[bytes | str | int]
    expires_ms: int
    state: bytes

    def as_fields(self) -> dict[bytes, bytes]:
        """The pairs as HGETALL gives the hash back (numbers and text as Redis stores them)."""
        fields: dict[Any, Any] = dict(zip(self.pairs[::2], self.pairs[1::2], strict=True))  # names are bytes
        for field in _NUMBER_FIELDS:
            fields[field] = b"%d" % fields[field]
        for field in _TEXT_FIELDS:
            if field in fields:
                fields[field] = fields[field].encode()
        return fields


def hash_from_row(row: Iterable[Any]) -> WarmHash:
    """A live row from Postgres, its columns in ColdRecord's order (select_columns.sql), as the hash Redis
    keeps of it. (Recovery builds one per row: no record in between, one pass, the size summed on the way as
    ``stored_size`` counts it.)"""
    (_, data_json, state_name, user_id, user_type, ip_address, user_agent, created_at, last_activity, expires_at,
     request_count, total_duration_ms, metadata_json, version) = row
    expires_ms = int(expires_at * 1000)
    state = STATE_CODES.get(state_name, b"a")
    pairs: list[bytes | str | int] = [
        VERSION, version, STATE, state, CREATED, int(created_at * 1000), LAST_ACTIVITY, int(last_activity * 1000),
        EXPIRES, expires_ms, REQUESTS, request_count, DURATION, total_duration_ms, FOLDED, version,
    ]
    for field, value in ((_USER_ID, user_id), (_USER_TYPE, user_type), (_IP_ADDRESS, ip_address),
                         (_USER_AGENT, user_agent)):
        if value is not None:
            pairs += (field, value)
    size = 0
    for prefix, document in ((DATA_PREFIX, data_json), (META_PREFIX, metadata_json)):
        if document == "{}":
            continue
        for key, value in orjson.loads(document).items():
            name = (prefix + key).encode()
            encoded = orjson.dumps(value)
            size += len(name) + len(encoded)
            pairs += (name, encoded)
    pairs += (SIZE, size)
    return WarmHash(pairs, expires_ms, state)


_RECORD_COLUMNS = operator.attrgetter(*(field.name for field in dataclasses.fields(ColdRecord)))


def hash_from_record(record: ColdRecord) -> WarmHash:
    return hash_from_row(_RECORD_COLUMNS(record))
