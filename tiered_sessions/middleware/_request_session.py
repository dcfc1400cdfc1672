"""A request's session as the handler sees it: a real ``dict`` of the session's ``data`` (so
``json.dumps(session)``, ``JSONResponse({"session": session})``, ``dict(session)`` and ``session |= data``
work), which notes whether it was read and what the request asked for (rotate, delete).

Rules: every mutating dict method (``[]=``, ``del``, ``update``, ``|=``, ``pop``, ``popitem``, ``setdefault``,
``clear``) checks that the session is still writable and that its keys are top-level names before it
changes anything; what is written is found by comparing with what was loaded (:mod:`._changes`), so in-place
edits of nested values count too. Any read or write sets ``accessed`` (the response then varies by cookie),
as does Starlette's ``request.session`` through :meth:`RequestSession.mark_accessed`. ``clear()`` ends the
session, as ``delete()`` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self

from ..errors import InvalidSessionData, SessionAlreadySaved
from ._changes import Baseline, check_key

if TYPE_CHECKING:
    from _collections_abc import dict_items, dict_keys, dict_values

    from ..model import Session

_MISSING: Any = object()


class RequestSession(dict[str, Any]):
    """A request's view of its session's ``data``: a dict, written when the response starts.

    - ``rotate(user_id=None)``: at login. When the response starts, the session moves to a fresh id
      (``manager.rotate``: the old id never works again) and the cookie follows; ``user_id`` also files
      the session under that user (``list_user_sessions``, ``revoke_user_sessions``).
    - ``delete()`` (or ``clear()``): at logout. The session is removed (``manager.remove``) and the cookie
      expired. Keys written after ``delete()`` go into a new session.
    """

    def __init__(self, session: Session | None, *, read_only: str | None = None,
                 cookie_signed_at: int | None = None) -> None:
        self._baseline = Baseline(session.data if session is not None else {})
        super().__init__(self._baseline.copy())
        self._loaded = session
        self.cookie_signed_at = cookie_signed_at
        self._rotate = False
        self._user_id: str | None = None
        self._ended = False
        self._frozen = read_only
        self.accessed = False

    # -- the session, beyond its data -------------------------------------------------------------------
    @property
    def id(self) -> str | None:
        """The session id as loaded (None for a visitor without a session yet, or after ``delete()``)."""
        return None if self._loaded is None or self._ended else self._loaded.session_id

    @property
    def session(self) -> Session | None:
        """The ``Session`` as loaded (attributes, counters, version), or None."""
        return None if self._ended else self._loaded

    @property
    def is_new(self) -> bool:
        return self.id is None

    @property
    def modified(self) -> bool:
        """True when the response will write something: changed keys, a rotation, a deletion."""
        changed, deleted = self.changes()
        return bool(changed or deleted or self._rotate or self._ended or self._user_id is not None)

    def mark_accessed(self) -> None:
        """Called by Starlette's ``request.session``: the response varies by cookie."""
        self.accessed = True

    def rotate(self, *, user_id: str | None = None) -> None:
        """Move the session to a fresh id when the response starts (call it at login)."""
        self._check_writable()
        if user_id is not None and not isinstance(user_id, str):
            raise InvalidSessionData("user_id must be a string")
        self._rotate = True
        self._user_id = user_id if user_id is not None else self._user_id

    def delete(self) -> None:
        """End the session when the response starts (call it at logout)."""
        self._check_writable()
        self._ended = True
        self._baseline = Baseline({})
        dict.clear(self)
        self._rotate = False
        self._user_id = None

    # -- writes ---------------------------------------------------------------------------------------
    def clear(self) -> None:
        """Same as ``delete()``: an emptied session is ended, not kept empty."""
        self.delete()

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_writable(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._check_writable(key)
        super().__delitem__(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        incoming = dict(*args, **kwargs)
        self._check_writable(*incoming)
        super().update(incoming)

    def __ior__(self, other: Any, /) -> Self:  # type: ignore[override,misc]
        self.update(other)
        return self

    def pop(self, key: str, default: Any = _MISSING, /) -> Any:
        self.accessed = True
        if not dict.__contains__(self, key):
            if default is _MISSING:
                raise KeyError(key)
            return default
        self._check_writable(key)
        return super().pop(key)

    def popitem(self) -> tuple[str, Any]:
        """Removes the last key, as ``dict.popitem`` does."""
        last = next(reversed(dict.keys(self)), _MISSING)
        self._check_writable(*([] if last is _MISSING else [last]))
        return super().popitem()

    def setdefault(self, key: str, default: Any = None, /) -> Any:
        if dict.__contains__(self, key):
            self.accessed = True
            return dict.__getitem__(self, key)
        self._check_writable(key)
        return super().setdefault(key, default)

    # -- reads ----------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        self.accessed = True
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None, /) -> Any:
        self.accessed = True
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.accessed = True
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self.accessed = True
        return super().__iter__()

    def __len__(self) -> int:
        self.accessed = True
        return super().__len__()

    def keys(self) -> dict_keys[str, Any]:
        self.accessed = True
        return super().keys()

    def values(self) -> dict_values[str, Any]:
        self.accessed = True
        return super().values()

    def items(self) -> dict_items[str, Any]:
        self.accessed = True
        return super().items()

    def copy(self) -> dict[str, Any]:
        self.accessed = True
        return dict.copy(self)

    def __eq__(self, other: object) -> bool:
        self.accessed = True
        return dict.__eq__(self, other)

    # -- what the middleware uses -----------------------------------------------------------------------
    def changes(self) -> tuple[dict[str, Any], list[str]]:
        """(keys set to a new value, keys deleted) since the session was loaded (or deleted)."""
        # Not dict.copy(self): with __iter__ overridden it reads through keys() and [], which count as reads.
        return self._baseline.changes({key: dict.__getitem__(self, key) for key in dict.__iter__(self)})

    @property
    def writable(self) -> bool:
        """False once saved (and in a WebSocket connection): writes would raise ``SessionAlreadySaved``."""
        return self._frozen is None

    def freeze(self, reason: str) -> None:
        self._frozen = reason

    def _check_writable(self, *keys: object) -> None:
        self.accessed = True
        if self._frozen is not None:
            raise SessionAlreadySaved(self._frozen)
        for key in keys:
            check_key(key)
