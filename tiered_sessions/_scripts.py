"""Lua scripts shipped beside the code, run by SHA with a reload when Redis has forgotten them."""

from __future__ import annotations

import hashlib
from importlib import resources


class LuaScript:
    """One script from ``tiered_sessions/lua``, after the ``lua/lib`` files it ``uses`` (Lua in Redis has no
    modules: shared functions are pasted in front). Not redis-py's ``Script``: that one sends SCRIPT EXISTS
    before every pipelined call; this one pipelines plain EVALSHA and reloads only on NOSCRIPT."""

    __slots__ = ("name", "sha", "source")

    def __init__(self, name: str, uses: tuple[str, ...] = ()) -> None:
        self.name = name
        lua = resources.files(__package__).joinpath("lua")
        self.source = "".join(lua.joinpath("lib", f"{lib}.lua").read_text() + "\n" for lib in uses) + \
            lua.joinpath(f"{name}.lua").read_text()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()


TOUCH = LuaScript("touch", uses=("live_counts",))
ENSURE = LuaScript("ensure", uses=("live_counts",))
UPDATE = LuaScript("update")
REMOVE = LuaScript("remove", uses=("live_counts",))
WARM = LuaScript("warm", uses=("live_counts",))
WARM_PAGE = LuaScript("warm_page", uses=("live_counts",))
CLAIM = LuaScript("claim")
ACK = LuaScript("ack")
REDIRTY = LuaScript("redirty")
ROTATE = LuaScript("rotate")
LEASE = LuaScript("lease")
LEASE_RELEASE = LuaScript("lease_release")
HEARTBEAT = LuaScript("heartbeat")
DIRTY_OF_USER = LuaScript("dirty_of_user")
LIVE_COUNT = LuaScript("live_count", uses=("live_counts",))
TIMED_OUT = LuaScript("timed_out", uses=("live_counts",))
LAYOUT = LuaScript("layout")
QUARANTINE = LuaScript("quarantine")


ALL = (TOUCH, ENSURE, UPDATE, REMOVE, WARM, WARM_PAGE, CLAIM, ACK, REDIRTY, ROTATE, LEASE, LEASE_RELEASE, HEARTBEAT,
       DIRTY_OF_USER, LIVE_COUNT, TIMED_OUT, LAYOUT, QUARANTINE)
