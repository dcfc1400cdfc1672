"""Automatic pipelining: hot-path calls that many tasks make in the same event-loop turn share one round trip.

Per call, redis-py's own work (checking out a connection, packing, parsing) is the limit, not Redis. Calls
queued while the loop runs other tasks are sent together at the end of the turn (no MULTI: each command is
independent and atomic on its own, as a Lua script is). While a round trip is in flight the next one
gathers, so a busy process keeps a few round trips in flight, each carrying many calls. Many calls go as two
round trips, so that Redis runs one while this process handles the other's replies.

A script written to take many calls at once (``combined``; update_activity's touch.lua) goes as one script
call per turn: Redis's per-script cost, larger than a touch's own work, is then paid once per turn.

The pipeline keeps the few connections it uses checked out between round trips: redis-py's pool takes a
lock and dispatches events on every checkout, which cost more than the round trip's own work for a single
call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Awaitable, Sequence
from typing import Any

from hiredis import pack_command
from redis.asyncio import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_client import RedisClient
from .scripts import LuaScript

log = logging.getLogger(__name__)

# A queued call: the command's arguments, the script it runs (None for a plain command), and its caller, or
# the callers of a combined script call (one reply each, in order).
_Call = tuple[tuple[Any, ...], LuaScript | None, "asyncio.Future[Any] | list[asyncio.Future[Any]]"]

KEPT_CONNECTIONS = 8  # idle connections kept between round trips; more in flight go back to the pool after
COMBINE_LIMIT = 256  # calls per combined script call: bounds how long one script holds Redis
SPLIT_AT = 16  # calls gathered in one loop turn from which they go as two round trips (see _send_queued)


@dataclasses.dataclass(slots=True)
class _Combined:
    """Calls of one script, gathering in this loop turn, to be sent as one script call."""

    script: LuaScript
    shared: tuple[Any, ...]
    keys: list[Any] = dataclasses.field(default_factory=list)
    args: list[Any] = dataclasses.field(default_factory=list)
    futures: list[asyncio.Future[Any]] = dataclasses.field(default_factory=list)

    def call(self) -> _Call:
        return (("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.shared, *self.args), self.script,
                self.futures)

    def halves(self) -> list[_Combined]:
        count = len(self.futures)
        if count < 2:
            return [self]
        keys, args, middle = len(self.keys) // count, len(self.args) // count, count // 2
        return [_Combined(self.script, self.shared, self.keys[:middle * keys], self.args[:middle * args],
                          self.futures[:middle]),
                _Combined(self.script, self.shared, self.keys[middle * keys:], self.args[middle * args:],
                          self.futures[middle:])]


class AutoPipeline:
    def __init__(self, client: RedisClient, timeout: float, max_batch: int = 1000) -> None:
        self.client = client
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[_Call] = []
        self._scheduled = False
        self._in_flight = 0  # round trips under way
        self._kept: list[AbstractConnection] = []
        self._combining: dict[tuple[str, tuple[Any, ...], int | None], _Combined] = {}

    def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        return self._call(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def command(self, *args: Any) -> Awaitable[Any]:
        return self._call(args, None)

    def combined(self, script: LuaScript, shared: tuple[Any, ...], keys: Sequence[Any], args: Sequence[Any],
                 slot: int | None = None) -> Awaitable[Any]:
        """One call of a script written to take many: its ARGV is ``shared``, then each call's ``args`` (a
        fixed number per call), its KEYS each call's ``keys``, and it replies with a list, one reply per call.
        Calls made in the same loop turn with the same script, shared args and ``slot`` (a cluster slot's
        stand-in; None on one Redis) go as one script call, so Redis pays its per-script cost once for all."""
        if self._quiet:
            return self._direct_combined(("EVALSHA", script.sha, len(keys), *keys, *shared, *args), script)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        group_key = (script.sha, shared, slot)
        group = self._combining.get(group_key)
        if group is None:
            group = self._combining[group_key] = _Combined(script, shared)
        group.keys += keys
        group.args += args
        group.futures.append(future)
        if len(group.futures) >= COMBINE_LIMIT:
            del self._combining[group_key]
            self._queue.append(group.call())
        self._schedule(loop)
        return future

    async def _direct_combined(self, args: tuple[Any, ...], script: LuaScript) -> Any:
        (reply,) = await self._direct(args, script)
        if isinstance(reply, Exception):
            raise reply
        return reply

    @property
    def _quiet(self) -> bool:
        """Nothing under way or gathering: a call may go straight out, without the hop through the loop that
        batching needs (calls arriving meanwhile see it in flight and batch up behind it)."""
        return not (self._in_flight or self._queue or self._combining)

    def _call(self, args: tuple[Any, ...], script: LuaScript | None) -> Awaitable[Any]:
        return self._direct(args, script) if self._quiet else self._enqueue(args, script)

    async def _direct(self, args: tuple[Any, ...], script: LuaScript | None) -> Any:
        self._in_flight += 1
        try:
            (result,) = await self.run([(args, script)])
        finally:
            self._in_flight -= 1
        if isinstance(result, Exception):
            raise result
        return result

    def _enqueue(self, args: tuple[Any, ...], script: LuaScript | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((args, script, future))
        self._schedule(loop)
        return future

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._scheduled:
            self._scheduled = True
            # call_soon runs after every task already ready in this turn has queued its call.
            loop.call_soon(self._send_queued)

    def _send_queued(self) -> None:
        """Send what this loop turn gathered. Many calls go as two round trips, not one: Redis runs the second
        while this process handles the first's replies (and its callers make their next calls). With one,
        each side waits for the other, and the pair is no faster than their sum."""
        self._scheduled = False
        calls, self._queue = self._queue, []
        groups = list(self._combining.values())
        self._combining.clear()
        if len(calls) + sum(len(group.futures) for group in groups) < SPLIT_AT:
            lanes = [calls + [group.call() for group in groups]]
        else:
            lanes = [calls[:len(calls) // 2], calls[len(calls) // 2:]]
            for group in groups:
                for lane, half in zip(lanes, group.halves(), strict=False):
                    lane.append(half.call())
        for lane in lanes:
            for start in range(0, len(lane), self.max_batch):  # an empty lane sends nothing
                task = asyncio.ensure_future(self._send(lane[start:start + self.max_batch]))
                task.add_done_callback(_report_unexpected)

    async def run(self, calls: Sequence[tuple[tuple[Any, ...], LuaScript | None]]) -> list[Any]:
        """Send ``(command args, script)`` calls now, in one round trip; error replies come back as
        exceptions in the list. A NOSCRIPT reply (Redis restarted or flushed) loads the script and reruns
        only those calls: NOSCRIPT means they did not run, so running them now is their first run."""
        results = await self._execute([args for args, _ in calls])
        retry = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if retry:
            scripts = {script.sha: script for i in retry if (script := calls[i][1]) is not None}
            for script in scripts.values():
                await self.client.script_load(script.source)
            again = await self._execute([calls[i][0] for i in retry])
            for i, result in zip(retry, again, strict=True):
                results[i] = result
        return results

    async def run_scripts(self, calls: Sequence[tuple[LuaScript, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Many script calls in one round trip (the flusher's claims and acks, recovery's warms); raises the
        first error reply."""
        results = await self.run([(("EVALSHA", script.sha, len(keys), *keys, *args), script)
                                  for script, keys, args in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _send(self, batch: list[_Call]) -> None:
        self._in_flight += 1
        try:
            await self._deliver(batch)
        finally:
            self._in_flight -= 1

    async def _deliver(self, batch: list[_Call]) -> None:
        try:
            results = await self.run([(args, script) for args, script, _ in batch])
        except asyncio.CancelledError:
            for _, _, target in batch:
                for future in _callers(target):
                    future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - not swallowed: every caller in the round trip gets it
            for _, _, target in batch:
                for future in _callers(target):
                    _settle(future, exc)
            return
        for (_, _, target), result in zip(batch, results, strict=True):
            if not isinstance(target, list):
                _settle(target, result)
            elif isinstance(result, list) and len(result) == len(target):
                for future, reply in zip(target, result, strict=True):
                    _settle(future, reply)
            else:  # an error for the whole script call (or a script that broke its contract)
                error = result if isinstance(result, Exception) else \
                    ResponseError(f"combined script call replied {type(result).__name__}, not one reply per call")
                for future in target:
                    _settle(future, error)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send the commands in one write and read every reply; error replies come back as exceptions.

        Replies are raw (no redis-py response callbacks): HGETALL gives a flat list; on a cluster, redis-py's
        callbacks apply (HGETALL gives a dict).
        """
        if isinstance(self.client, RedisCluster):
            return await self._execute_cluster(self.client, commands)
        pool = self.client.connection_pool
        connection = await self._checkout(pool)
        results: list[Any] = []
        try:
            await connection.send_packed_command(b"".join(map(pack, commands)), check_health=False)
            # One deadline for the whole batch: a timer per reply cost a fifth of the hot path's CPU.
            async with asyncio.timeout(self.timeout):
                for _ in commands:
                    try:
                        results.append(await connection.read_response(timeout=math.inf))
                    except ResponseError as exc:
                        results.append(exc)
        except BaseException as exc:
            # Replies may still be on their way (a timeout, a cancelled caller): the connection is unusable.
            await connection.disconnect(nowait=True)
            await pool.release(connection)
            if isinstance(exc, TimeoutError):
                raise RedisTimeoutError(f"no reply from Redis within {self.timeout}s") from None
            raise
        if len(self._kept) < KEPT_CONNECTIONS:
            self._kept.append(connection)
        else:
            await pool.release(connection)
        return results

    async def _checkout(self, pool: ConnectionPool) -> AbstractConnection:
        """A kept connection, or one from the pool, made sure to be open: one the server closed meanwhile (a
        restart, a CLIENT KILL) is disconnected here, and sending reconnects it. redis-py's own checkout
        skips that check when maintenance notifications are on ("auto" by default)."""
        if self._kept:
            connection = self._kept.pop()
        else:
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        reader = getattr(connection, "_reader", None)
        if reader is not None and reader.at_eof():
            await connection.disconnect(nowait=True)
        return connection

    async def aclose(self) -> None:
        """Give the kept connections back to the pool (before the client closes it)."""
        if isinstance(self.client, RedisCluster):
            return
        kept, self._kept = self._kept, []
        for connection in kept:
            await self.client.connection_pool.release(connection)

    async def _execute_cluster(self, client: RedisCluster, commands: list[tuple[Any, ...]]) -> list[Any]:
        """On a cluster: redis-py's cluster pipeline sends each node its commands (one round trip per node, in
        parallel) and reruns those answered MOVED/ASK (a failover, a resharding) against the right node."""
        pipe = client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        try:
            async with asyncio.timeout(self.timeout):
                results: list[Any] = await pipe.execute(raise_on_error=False)
        except TimeoutError:
            raise RedisTimeoutError(f"no reply from the Redis Cluster within {self.timeout}s") from None
        return results


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP, by hiredis's C packer (twice as fast as ``_pack_python``, the same bytes);
    ``_pack_python`` takes the arguments hiredis refuses (bytearray)."""
    try:
        packed: bytes = pack_command(args)
    except TypeError:
        return _pack_python(args)
    return packed


def _pack_python(args: tuple[Any, ...]) -> bytes:
    """One command in RESP. Leaner than redis-py's generic packer, which was a third of the hot path's CPU."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        kind = type(arg)
        if kind is str:
            value = arg.encode()
        elif kind is int:
            value = b"%d" % arg
        elif kind is bytes:
            value = arg
        elif isinstance(arg, bytes | bytearray | memoryview):
            value = bytes(arg)
        elif isinstance(arg, int | float):
            value = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%b\r\n" % (len(value), value))
    return b"".join(parts)


def _callers(target: asyncio.Future[Any] | list[asyncio.Future[Any]]) -> list[asyncio.Future[Any]]:
    return target if isinstance(target, list) else [target]


def _settle(future: asyncio.Future[Any], result: Any) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)


def _report_unexpected(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("automatic pipeline failed", exc_info=task.exception())
