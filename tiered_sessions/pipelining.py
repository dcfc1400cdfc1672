"""Automatic pipelining: hot-path calls that many tasks make in the same event-loop turn share one round trip.

Per call, redis-py's own work (checking out a connection, packing, parsing) is the limit, not Redis. Calls
queued while the loop runs other tasks are sent together at the end of the turn as one pipeline
(no MULTI: each command is independent and atomic on its own, as a Lua script is). While a pipeline is in
flight the next one gathers, so a busy process keeps a few round trips in flight, each carrying many calls.

The pipeline keeps the few connections it uses checked out between round trips: redis-py's pool takes a
lock and dispatches events on every checkout, which cost more than the round trip's own work for a single
call.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .redis_client import RedisClient
from .scripts import LuaScript

log = logging.getLogger(__name__)

# A queued call: the command's arguments, the script it runs (None for a plain command), and its caller.
_Call = tuple[tuple[Any, ...], LuaScript | None, "asyncio.Future[Any]"]

KEPT_CONNECTIONS = 8  # idle connections kept between round trips; more in flight go back to the pool after


class AutoPipeline:
    def __init__(self, client: RedisClient, timeout: float, max_batch: int = 1000) -> None:
        self.client = client
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[_Call] = []
        self._scheduled = False
        self._in_flight = 0  # round trips under way
        self._kept: list[AbstractConnection] = []

    def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        return self._call(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def command(self, *args: Any) -> Awaitable[Any]:
        return self._call(args, None)

    def _call(self, args: tuple[Any, ...], script: LuaScript | None) -> Awaitable[Any]:
        if self._in_flight or self._queue:
            return self._enqueue(args, script)
        # Nothing else under way (a quiet process): send it now, without the hop through the loop that
        # batching needs. Calls arriving meanwhile see it in flight and batch up behind it.
        return self._direct(args, script)

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
        if not self._scheduled:
            self._scheduled = True
            # call_soon runs after every task already ready in this turn has queued its call.
            loop.call_soon(self._send_queued)
        return future

    def _send_queued(self) -> None:
        self._scheduled = False
        queue, self._queue = self._queue, []
        for start in range(0, len(queue), self.max_batch):
            batch = queue[start:start + self.max_batch]
            task = asyncio.ensure_future(self._send(batch))
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
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - not swallowed: every caller in the round trip gets it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller was cancelled meanwhile
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

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
    """One command in RESP. Leaner than redis-py's generic packer, which was a third of the hot path's CPU."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if type(arg) is bytes:
            value = arg
        elif type(arg) is str:
            value = arg.encode()
        elif type(arg) is int:
            value = b"%d" % arg
        elif isinstance(arg, bytes | bytearray | memoryview):
            value = bytes(arg)
        elif isinstance(arg, int | float):
            value = repr(arg).encode()
        else:
            raise TypeError(f"cannot send {type(arg).__name__} to Redis")
        parts.append(b"$%d\r\n%s\r\n" % (len(value), value))
    return b"".join(parts)


def _report_unexpected(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("automatic pipeline failed", exc_info=task.exception())
