"""Combined script calls: the calls of a script written to take many (touch.lua) that one loop turn gathers go
as one script call, so that Redis pays its per-script cost once for all of them.

Such a script's ARGV is its shared values, then two the pipeline adds, the key layout and the time the calls
are sent (Unix ms: they share it), then each call's own values (a fixed number per call). Its KEYS are each
call's key(s), and it replies with a list, one reply per call. Key layouts:

* ``"0"``, one Redis: the script finds the other keys it writes from each call's key.
* ``"1"``, one Redis Cluster slot: those keys come declared after the calls' keys. Redis checks declared keys
  before a script runs (ASK, TRYAGAIN while the slot moves); an undeclared one fails midway, after writes.
* ``"2"``, several slots of one master (a cluster): no KEYS (Redis refuses declared keys of several slots);
  after the time come the number of calls and their keys, then the calls' values. The script finds the other
  keys as with ``"0"`` and looks every one up before it writes anything: if a slot is moving, the call
  writes nothing and replies TRYAGAIN, and its slots' calls go again one slot each (layout ``"1"``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from typing import Any

from ._codec import now_ms
from ._scripts import LuaScript

# A queued call: the command's arguments, the script it runs (None for a plain command), and its caller, or
# the callers of a combined script call (one reply each, in order).
Call = tuple[tuple[Any, ...], LuaScript | None, "asyncio.Future[Any] | list[asyncio.Future[Any]]"]

DERIVED, DECLARED, PROBED = "0", "1", "2"


@dataclasses.dataclass(slots=True)
class Combined:
    """Calls of one script, gathering in this loop turn, to be sent as one script call."""

    script: LuaScript
    shared: tuple[Any, ...]
    declared: tuple[str, ...] = ()  # keys every call of the group touches (one slot's), declared after the calls'
    keys: list[Any] = dataclasses.field(default_factory=list)
    args: list[Any] = dataclasses.field(default_factory=list)
    futures: list[asyncio.Future[Any]] = dataclasses.field(default_factory=list)

    def call(self) -> Call:
        return (combined_args(self.script, self.shared, self.declared, self.keys, self.args), self.script,
                self.futures)

    def halves(self) -> list[Combined]:
        count = len(self.futures)
        if count < 2:
            return [self]
        keys, args, middle = len(self.keys) // count, len(self.args) // count, count // 2
        return [Combined(self.script, self.shared, self.declared, self.keys[:middle * keys],
                         self.args[:middle * args], self.futures[:middle]),
                Combined(self.script, self.shared, self.declared, self.keys[middle * keys:],
                         self.args[middle * args:], self.futures[middle:])]


def combined_args(script: LuaScript, shared: tuple[Any, ...], declared: tuple[str, ...], keys: Sequence[Any],
                  args: Sequence[Any]) -> tuple[Any, ...]:
    return ("EVALSHA", script.sha, len(keys) + len(declared), *keys, *declared, *shared,
            DECLARED if declared else DERIVED, now_ms(), *args)


class Merged(list["asyncio.Future[Any]"]):
    """The callers of a script call that carries several slots' combined calls (layout ``"2"``), and those
    calls, to send one slot each if the call was not run."""

    __slots__ = ("groups",)

    def __init__(self, groups: list[Combined]) -> None:
        super().__init__(future for group in groups for future in group.futures)
        self.groups = groups


def merged_call(groups: list[Combined]) -> Call:
    """One script call for the combined calls of several slots on one master (same script, same shared args)."""
    first = groups[0]
    keys = [key for group in groups for key in group.keys]
    args = [arg for group in groups for arg in group.args]
    return (("EVALSHA", first.script.sha, 0, *first.shared, PROBED, now_ms(), len(keys), *keys, *args),
            first.script, Merged(groups))


def one_slot_each(batch: list[Call]) -> list[Call]:
    """The batch with each merged call replaced by its slots' own calls."""
    out: list[Call] = []
    for call in batch:
        target = call[2]
        if isinstance(target, Merged):
            out.extend(group.call() for group in target.groups)
        else:
            out.append(call)
    return out
