"""Automatic pipelining: hot-path calls that many tasks make in the same event-loop turn share one round trip.

Per call, redis-py's own work (checking out a connection, packing, parsing) is the limit, not Redis. Calls
queued while the loop runs other tasks are sent together at the end of the turn (no MULTI: each command is
independent and atomic on its own, as a Lua script is). While a round trip is in flight the next one
gathers, so a busy process keeps a few round trips in flight, each carrying many calls. Many calls go as two
round trips, so that Redis runs one while this process handles the other's replies.

A script written to take many calls at once (``combined``; update_activity's touch.lua) goes as one script
call per turn: Redis's per-script cost, larger than a touch's own work, is then paid once per turn.

On one Redis the pipeline holds two connections (one per round trip in flight; more batches queue behind
them on the same connection) and reads their replies itself (``PipelinedConnection``): a round trip costs one
write and one read callback, with no task, checkout or stream read on the way. On a cluster, a loop turn's
calls go to each master in one round trip on a connection of its own (``ClusterLanes``), its combined calls
as one script call (``_combining``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Iterable, Sequence
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from ._cluster_lanes import REDIRECTED, ClusterLanes, first_key
from ._combining import Call, Combined, Merged, combined_args, merged_call, one_slot_each
from ._pipelined_connection import PipelinedConnection, pack
from ._redis_client import RedisClient, executed
from ._scripts import LuaScript

log = logging.getLogger(__name__)

LANES = 2  # connections, one per round trip in flight (see _send_queued)
COMBINE_LIMIT = 256  # calls per combined script call: bounds how long one script holds Redis
SPLIT_AT = 16  # calls gathered in one loop turn from which they go as two round trips (see _send_queued)


class AutoPipeline:
    def __init__(self, client: RedisClient, timeout: float, max_batch: int = 1000) -> None:
        self.client = client
        self.timeout = timeout
        self.max_batch = max_batch
        self._queue: list[Call] = []
        self._scheduled = False
        self._in_flight = 0  # round trips under way
        self._lanes: list[PipelinedConnection | None] = [None] * LANES  # one Redis only
        self._opening = asyncio.Lock()
        self._cluster = ClusterLanes(client, timeout) if isinstance(client, RedisCluster) else None
        # Replies of calls that did not run, and run again: NOSCRIPT (after loading the scripts), and on a
        # cluster a redirection
        self._not_run: tuple[type[Exception], ...] = (NoScriptError, *REDIRECTED) if self._cluster else \
            (NoScriptError,)
        self._combining: dict[tuple[str, tuple[Any, ...], int | None], Combined] = {}

    def evalsha(self, script: LuaScript, keys: Sequence[str], args: Sequence[Any]) -> Awaitable[Any]:
        return self._call(("EVALSHA", script.sha, len(keys), *keys, *args), script)

    def command(self, *args: Any) -> Awaitable[Any]:
        return self._call(args, None)

    def combined(self, script: LuaScript, shared: tuple[Any, ...], keys: Sequence[Any], args: Sequence[Any],
                 slot: int | None = None, declared: tuple[str, ...] = ()) -> Awaitable[Any]:
        """One call of a script written to take many (see ``_combining``): ``keys`` and ``args`` are this
        call's, ``shared`` and ``declared`` (keys of the slot every call touches) the group's. Calls made in
        the same loop turn with the same script, shared args and ``slot`` (a cluster slot's stand-in, which
        decides ``declared``; None on one Redis) go as one script call, and on a cluster the groups of one
        master's slots as one too."""
        if self._quiet:
            return self._direct_combined(combined_args(script, shared, declared, keys, args), script)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        group_key = (script.sha, shared, slot)
        group = self._combining.get(group_key)
        if group is None:
            group = self._combining[group_key] = Combined(script, shared, declared)
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
        # On a cluster, one round trip per master: the masters already run side by side, and a script call per
        # master and turn, as large as can be, is what keeps their share of the cores small.
        if self._cluster is not None or len(calls) + sum(len(group.futures) for group in groups) < SPLIT_AT:
            lanes = [calls + self._script_calls(groups)]
        else:
            halves: tuple[list[Combined], list[Combined]] = ([], [])
            for group in groups:
                for lane_groups, half in zip(halves, group.halves(), strict=False):
                    lane_groups.append(half)
            lanes = [calls[:len(calls) // 2] + self._script_calls(halves[0]),
                     calls[len(calls) // 2:] + self._script_calls(halves[1])]
        for index, lane in enumerate(lanes):
            for connection, calls_there in self._by_connection(lane, index):
                for start in range(0, len(calls_there), self.max_batch):  # an empty lane sends nothing
                    batch = calls_there[start:start + self.max_batch]
                    if connection is not None and connection.usable:
                        # The common case: written now, replies handled by the read callback (_replied)
                        self._in_flight += 1
                        connection.send(b"".join([pack(args) for args, _, _ in batch]), len(batch),
                                        functools.partial(self._replied, batch))
                    else:  # the connection is to be opened first, or a cluster's slot is not mapped yet
                        task = asyncio.ensure_future(self._send(batch, index))
                        task.add_done_callback(_report_unexpected)

    def _script_calls(self, groups: list[Combined]) -> list[Call]:
        """The groups' script calls: one each, but on a cluster one for all the groups of a master's slots
        that share script and shared args (layout "2", see ``_combining``)."""
        if self._cluster is None:
            return [group.call() for group in groups]
        calls: list[Call] = []
        by_master: dict[tuple[str, tuple[Any, ...], str], list[Combined]] = {}
        for group in groups:
            master = self._cluster.master_of(group.keys[0])
            if master is None or not group.declared:
                calls.append(group.call())
            else:
                by_master.setdefault((group.script.sha, group.shared, master.name), []).append(group)
        calls += [same[0].call() if len(same) == 1 else merged_call(same) for same in by_master.values()]
        return calls

    def _by_connection(self, calls: list[Call], lane: int) -> list[tuple[PipelinedConnection | None, list[Call]]]:
        """The lane's calls by the connection they go out on: on one Redis, all on the lane's; on a cluster, each
        master's on the lane's connection to it (None: to be opened, or the slot is not mapped yet)."""
        if self._cluster is None:
            return [(self._lanes[lane], calls)]
        cluster = self._cluster
        keys = [target.groups[0].keys[0] if isinstance(target, Merged) else first_key(args)
                for args, _, target in calls]
        return [(None if master is None else cluster.ready(master, lane), [calls[i] for i in indices])
                for master, indices in cluster.route(keys).items()]

    def _replied(self, batch: list[Call], replies: list[Any] | Exception) -> None:
        self._in_flight -= 1
        if not isinstance(replies, Exception) and any(isinstance(reply, self._not_run) for reply in replies):
            # Redis lost its scripts (a restart, SCRIPT FLUSH), or a cluster's slot lives elsewhere now: run
            # those calls again (loading the scripts first), off this read callback. A merged call goes again
            # one slot each.
            kept: tuple[list[Call], list[Any]] = ([], [])
            again: list[Call] = []
            for call, reply in zip(batch, replies, strict=True):
                if isinstance(reply, self._not_run) and isinstance(call[2], Merged):
                    again.append(call)
                else:
                    kept[0].append(call)
                    kept[1].append(reply)
            if again:
                batch, replies = kept
                task = asyncio.ensure_future(self._send(one_slot_each(again), 0))
                task.add_done_callback(_report_unexpected)
            if any(isinstance(reply, self._not_run) for reply in replies):
                task = asyncio.ensure_future(self._send(batch, 0, replies))
                task.add_done_callback(_report_unexpected)
                return
        _deliver_replies(batch, replies)

    async def run(self, calls: Sequence[tuple[tuple[Any, ...], LuaScript | None]], lane: int = 0) -> list[Any]:
        """Send ``(command args, script)`` calls now, in one round trip (per master on a cluster); error replies
        come back as exceptions in the list. Calls answered NOSCRIPT (Redis restarted or flushed: the scripts
        are loaded first) or, on a cluster, MOVED, ASK or TRYAGAIN run again: such a reply means they did not
        run, so running them now is their first run."""
        return await self._rerun(calls, await self._execute([args for args, _ in calls], lane), lane)

    async def _rerun(self, calls: Sequence[tuple[tuple[Any, ...], LuaScript | None]], results: list[Any],
                     lane: int) -> list[Any]:
        for _attempt in range(2):  # a call redirected to a master that lacks the script comes back NOSCRIPT
            retry = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if retry:
                await self.load_scripts({script.sha: script for i in retry if (script := calls[i][1]) is not None}
                                        .values())
                again = await self._execute([calls[i][0] for i in retry], lane)
                for i, result in zip(retry, again, strict=True):
                    results[i] = result
            if self._cluster is not None:
                await self._cluster.follow_redirections([args for args, _ in calls], results, lane)
            if not any(isinstance(result, NoScriptError) for result in results):
                break
        return results

    async def load_scripts(self, scripts: Iterable[LuaScript]) -> None:
        """SCRIPT LOAD each script (on a cluster, into every primary), in one round trip on one Redis: at start,
        and after a NOSCRIPT reply (Redis restarted or flushed)."""
        if isinstance(self.client, RedisCluster):
            for script in scripts:
                await self.client.script_load(script.source)
            return
        load = self.client.pipeline(transaction=False)
        for script in scripts:
            load.script_load(script.source)
        await executed(load.execute())

    async def run_scripts(self, calls: Sequence[tuple[LuaScript, Sequence[str], Sequence[Any]]]) -> list[Any]:
        """Many script calls in one round trip (the flusher's claims and acks, recovery's warms); raises the
        first error reply."""
        results = await self.run([(("EVALSHA", script.sha, len(keys), *keys, *args), script)
                                  for script, keys, args in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    async def _send(self, batch: list[Call], lane: int, replies: list[Any] | None = None) -> None:
        """A batch that could not be written at once (a cluster, a connection to open), or whose ``replies``
        came back with scripts to load and calls to run again."""
        if replies is None:
            batch = one_slot_each(batch)  # the way round, where a moving slot is found: no need to merge
        self._in_flight += 1
        calls = [(args, script) for args, script, _ in batch]
        try:
            results: list[Any] | Exception = await (self.run(calls, lane) if replies is None else
                                                    self._rerun(calls, replies, lane))
        except asyncio.CancelledError:
            for _, _, target in batch:
                for future in _callers(target):
                    future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - not swallowed: every caller in the round trip gets it
            results = exc
        finally:
            self._in_flight -= 1
        _deliver_replies(batch, results)

    async def _execute(self, commands: list[tuple[Any, ...]], lane: int = 0) -> list[Any]:
        """Send the commands in one write and wait for every reply; error replies come back as exceptions.

        Replies are raw (no redis-py response callbacks): HGETALL gives a flat list (a dict on RESP3, or where
        a cluster's call went through redis-py).
        """
        if self._cluster is not None:
            return await self._cluster.execute(commands, lane)
        connection = await self._connection(lane)
        return await connection.request(b"".join([pack(args) for args in commands]), len(commands))

    async def _connection(self, lane: int) -> PipelinedConnection:
        """The lane's connection, opened (again) if it is not usable: the server closed it (a restart, a
        CLIENT KILL) or it timed out."""
        current = self._lanes[lane]
        if current is not None and current.usable:
            return current
        async with self._opening:
            current = self._lanes[lane]
            if current is not None and current.usable:
                return current
            self._lanes[lane] = None
            assert not isinstance(self.client, RedisCluster)
            pool = self.client.connection_pool
            if current is not None:
                await current.release()
                await pool.release(current.connection)
            connection = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                if getattr(connection, "_reader", None) is None or connection._reader.at_eof():
                    await connection.disconnect(nowait=True)
                    await connection.connect()
                opened = PipelinedConnection(connection, self.timeout)
            except BaseException:
                await connection.disconnect(nowait=True)
                await pool.release(connection)
                raise
            self._lanes[lane] = opened
            return opened

    async def aclose(self) -> None:
        """Close this pipeline's connections and give them back to the pool (before the client closes it)."""
        if self._cluster is not None:
            await self._cluster.aclose()
            return
        assert not isinstance(self.client, RedisCluster)
        lanes, self._lanes = self._lanes, [None] * LANES
        for connection in lanes:
            if connection is not None:
                await connection.release()
                await self.client.connection_pool.release(connection.connection)


def _deliver_replies(batch: list[Call], results: list[Any] | Exception) -> None:
    """Hand each caller in a round trip its reply, or all of them the error that ended the round trip."""
    if isinstance(results, Exception):
        for _, _, target in batch:
            for future in _callers(target):
                _settle(future, results)
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
