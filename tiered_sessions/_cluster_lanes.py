"""On a Redis Cluster, the automatic pipeline's own connections: one per master and round trip in flight, each
read by a ``PipelinedConnection``, so that a cluster round trip costs what one Redis's does (redis-py's cluster
pipeline costs a task, a node lookup and a connection checkout per call, and reads one reply per ``await``).

A call goes to the master that owns its first key's slot in redis-py's slot map. A call answered MOVED, ASK or
TRYAGAIN did not run, and is sent again here: after MOVED to the slot's new master (the map updated), after ASK
to the migration's target (ASKING first), after TRYAGAIN a moment later. A call whose connection is lost on the
way fails: it may have run, and is never sent a second time (redis-py's cluster pipeline runs the whole
pipeline again after a lost connection, counting a touch twice). Only a slot not mapped yet, or a master that
cannot be reached, goes through redis-py's client, which re-maps the cluster (a failover).
These connections are this module's, apart from redis-py's node pools: redis-py closes its own connections when
it re-maps the cluster, under whatever call uses them (see ``_redis_client.closed_under_the_call``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.cluster import PRIMARY
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError, TryAgainError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ._failures import REDIS_CONNECTION_ERRORS
from ._pipelined_connection import PipelinedConnection, pack
from ._redis_client import executed

log = logging.getLogger(__name__)

# Replies that mean "not run here": the call is sent again where the slot lives (follow_redirections).
REDIRECTED: Final = (MovedError, AskError, TryAgainError)
REDIRECTIONS: Final = 16  # a call's redirections before its last one is its error (redis-py's TTL)
TRYAGAIN_PAUSE: Final = 0.05  # seconds: a slot's keys are moving, some here and some there


def first_key(command: tuple[Any, ...]) -> str | bytes:
    """A command's first key: EVALSHA's after the key count, any other's first argument (every command the
    pipeline sends names a key; a script call's keys are of one slot, or given apart, see _combining)."""
    return command[3] if command[0] == "EVALSHA" else command[1]  # type: ignore[no-any-return]


class ClusterLanes:
    def __init__(self, client: RedisCluster, timeout: float) -> None:
        self.client = client
        self.timeout = timeout
        self._connections: dict[tuple[str, int], PipelinedConnection] = {}
        # One per connection: a master slow to answer while its connection opens holds up no other
        self._opening: dict[tuple[str, int], asyncio.Lock] = {}

    def master_of(self, key: str | bytes) -> ClusterNode | None:
        """The master that owns the key's slot, as redis-py last mapped it (None: not mapped yet)."""
        nodes = self.client.nodes_manager.slots_cache.get(key_slot(key.encode() if isinstance(key, str) else key))
        return nodes[0] if nodes else None

    def route(self, keys: Sequence[str | bytes]) -> dict[ClusterNode | None, list[int]]:
        """The indices of the calls whose (first) keys these are, by the master they go to."""
        by_master: dict[ClusterNode | None, list[int]] = {}
        for index, key in enumerate(keys):
            by_master.setdefault(self.master_of(key), []).append(index)
        return by_master

    def ready(self, master: ClusterNode, lane: int) -> PipelinedConnection | None:
        """The lane's open connection to ``master``, or None if it is to be opened (first use, or lost)."""
        connection = self._connections.get((master.name, lane))
        return connection if connection is not None and connection.usable else None

    async def connection(self, master: ClusterNode, lane: int) -> PipelinedConnection:
        """The lane's connection to ``master``, opened (again) if need be with redis-py's settings for that node
        (TLS, AUTH, HELLO and the client name: every URL option)."""
        if (connection := self.ready(master, lane)) is not None:
            return connection
        async with self._opening.setdefault((master.name, lane), asyncio.Lock()):
            if (connection := self.ready(master, lane)) is not None:
                return connection
            lost = self._connections.pop((master.name, lane), None)
            if lost is not None:
                await lost.release()
            # No retries below the cluster client's: a master that does not answer is redis-py's to re-map.
            opened = master.connection_class(**{**master.connection_kwargs, "retry": Retry(NoBackoff(), 0)})
            try:
                await opened.connect()  # type: ignore[no-untyped-call]
                connection = PipelinedConnection(opened, self.timeout)
            except BaseException:
                await opened.disconnect(nowait=True)
                raise
            self._connections[(master.name, lane)] = connection
            return connection

    async def execute(self, commands: list[tuple[Any, ...]], lane: int) -> list[Any]:
        """Each master's commands on the lane's connection to it, side by side; error replies come back as
        exceptions in the list. A slot not mapped yet, or a master that cannot be reached (gone in a
        failover), is redis-py's: it re-maps the cluster."""
        results: list[Any] = [None] * len(commands)

        async def on(master: ClusterNode | None, indices: list[int]) -> None:
            there = [commands[i] for i in indices]
            replies: list[Any] | None = None
            if master is not None:
                try:
                    connection = await self.connection(master, lane)
                except REDIS_CONNECTION_ERRORS:  # nothing was sent
                    log.debug("no connection to %s: its calls go through the cluster client", master.name)
                else:
                    replies = await connection.request(b"".join([pack(args) for args in there]), len(there))
            if replies is None:
                replies = await self.via_redis_py(there)
            for i, reply in zip(indices, replies, strict=True):
                results[i] = reply

        routes = self.route([first_key(command) for command in commands])
        if len(routes) == 1:
            await on(*next(iter(routes.items())))
        else:
            await asyncio.gather(*(on(master, indices) for master, indices in routes.items()))
        return results

    async def follow_redirections(self, commands: list[tuple[Any, ...]], results: list[Any], lane: int) -> None:
        """Send again, replacing their results, the commands answered MOVED, ASK or TRYAGAIN, until none is or
        ``REDIRECTIONS`` rounds have gone by (then the last answer is the result)."""
        for _round in range(REDIRECTIONS):
            pending = [i for i, result in enumerate(results) if isinstance(result, REDIRECTED)]
            if not pending:
                return
            if any(isinstance(results[i], TryAgainError) for i in pending):
                await asyncio.sleep(TRYAGAIN_PAUSE)
            routed: list[int] = []
            asked: dict[str, tuple[ClusterNode, list[int]]] = {}
            for i in pending:
                error = results[i]
                if isinstance(error, AskError):
                    node = self._node_at(error.host, error.port)
                    asked.setdefault(node.name, (node, []))[1].append(i)
                else:
                    if isinstance(error, MovedError):
                        await self.client.nodes_manager.move_slot(error)
                    routed.append(i)
            sends = [self._asking(node, [commands[i] for i in indices], lane) for node, indices in asked.values()]
            if routed:
                sends.append(self.execute([commands[i] for i in routed], lane))
            for indices, replies in zip([indices for _, indices in asked.values()] + ([routed] if routed else []),
                                        await asyncio.gather(*sends), strict=True):
                for i, reply in zip(indices, replies, strict=True):
                    results[i] = reply

    def _node_at(self, host: str, port: int) -> ClusterNode:
        return self.client.nodes_manager.get_node(host, port) or ClusterNode(
            host, port, PRIMARY, **self.client.nodes_manager.connection_kwargs)

    async def _asking(self, node: ClusterNode, commands: list[tuple[Any, ...]], lane: int) -> list[Any]:
        """The commands on the migration target, each after ASKING (which admits the one command after it)."""
        connection = await self.connection(node, lane)
        asking = pack(("ASKING",))
        replies = await connection.request(b"".join(asking + pack(command) for command in commands),
                                           2 * len(commands))
        return replies[1::2]

    async def via_redis_py(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Through redis-py's cluster pipeline: it sends each node its commands, reruns those answered MOVED,
        ASK or TRYAGAIN against the right node, and re-maps the cluster when a node is gone."""
        pipe = self.client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        try:
            async with asyncio.timeout(self.timeout):
                return await executed(pipe.execute(raise_on_error=False))
        except TimeoutError:
            raise RedisTimeoutError(f"no reply from the Redis Cluster within {self.timeout}s") from None

    async def aclose(self) -> None:
        """Close every connection (what still waits on one fails with a ConnectionError)."""
        connections, self._connections = list(self._connections.values()), {}
        for connection in connections:
            await connection.release()
