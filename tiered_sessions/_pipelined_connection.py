"""A Redis connection that reads its own replies: batches of commands go out back to back, and each batch's
replies reach its callback straight from the event loop's read callback, in the order the batches were sent.

redis-py reads one reply per ``await``: a task, a stream read and a chain of coroutines per round trip, which
cost more than the hot path's own work for a batch of a few calls. redis-py still opens the connection (TCP,
TLS or a Unix socket, then AUTH, HELLO, SELECT and the client name: every URL option); this protocol then takes
over its transport, and the connection goes back to the pool, closed, when it is done.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from collections.abc import Callable
from typing import Any, Final

import hiredis
from hiredis import pack_command
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse
from redis.exceptions import TimeoutError as RedisTimeoutError

# RESP3 push messages (server notifications) come between replies, answering nothing: they are skipped.
_PUSH: Final = getattr(hiredis, "PushNotification", None)

_FEED_BYTES: Final = 16384

# A batch's replies (error replies as exceptions, as redis-py raises them), or the error that ended the whole
# batch: the connection was lost, or Redis did not answer in time.
OnReplies = Callable[[list[Any] | Exception], None]


@dataclasses.dataclass(slots=True)
class _Batch:
    count: int
    on_replies: OnReplies
    deadline: float
    replies: list[Any] = dataclasses.field(default_factory=list)


class PipelinedConnection(asyncio.Protocol):
    def __init__(self, connection: AbstractConnection, timeout: float) -> None:
        """Take over ``connection``, which redis-py has opened and made ready (nothing may be waiting on it)."""
        writer = connection._writer  # redis-py's StreamWriter: its transport is what this protocol takes
        if writer is None:
            raise RedisConnectionError("the connection to take over is not open")
        self.connection = connection
        self.timeout = timeout
        self._loop = asyncio.get_running_loop()
        # parse_error gives the error classes redis-py's own parser gives (NoScriptError for NOSCRIPT, ...)
        self._reader = hiredis.Reader(protocolError=InvalidResponse, replyError=BaseParser.parse_error)
        self._waiting: collections.deque[_Batch] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._lost = False
        self._transport: asyncio.Transport = writer.transport  # type: ignore[assignment]
        # Told when the connection closes, so that redis-py sees it closed too (its close() waits for that)
        self._stream_protocol = self._transport.get_protocol()
        self._transport.set_protocol(self)

    @property
    def usable(self) -> bool:
        return not self._lost and not self._transport.is_closing()

    @property
    def waiting(self) -> int:
        """Batches sent and not yet answered."""
        return len(self._waiting)

    def send(self, data: bytes, count: int, on_replies: OnReplies) -> None:
        """Write ``count`` packed commands; ``on_replies`` gets their replies (or the error that ended them)."""
        if not self.usable:
            raise RedisConnectionError("Connection to Redis is closed.")
        if count == 0:  # no reply would ever come to complete it
            on_replies([])
            return
        self._transport.write(data)
        deadline = self._loop.time() + self.timeout
        self._waiting.append(_Batch(count, on_replies, deadline))
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._check_deadline)

    def request(self, data: bytes, count: int) -> asyncio.Future[list[Any]]:
        """``send``, with a future for the replies (a caller cancelling it leaves the connection sound)."""
        future: asyncio.Future[list[Any]] = self._loop.create_future()

        def settle(replies: list[Any] | Exception) -> None:
            if future.done():
                return
            if isinstance(replies, Exception):
                future.set_exception(replies)
            else:
                future.set_result(replies)

        self.send(data, count, settle)
        return future

    def data_received(self, data: bytes) -> None:
        # Fed 16 KiB at a time: hiredis moves its unread bytes down after every reply it returns, which over a
        # whole 256 KiB read of small replies cost eight times the parsing
        try:
            for offset in range(0, len(data), _FEED_BYTES):
                self._reader.feed(data, offset, min(_FEED_BYTES, len(data) - offset))
                self._hand_out()
        except InvalidResponse as exc:
            self._end(exc)

    def _hand_out(self) -> None:
        """Give each batch whose replies are all in its replies, in the order the batches were sent."""
        reader, waiting = self._reader, self._waiting
        while waiting:
            batch = waiting[0]
            replies = batch.replies
            while len(replies) < batch.count:
                reply = reader.gets()
                if reply is False:  # the rest has not arrived yet
                    return
                if type(reply) is not _PUSH:
                    replies.append(reply)
            waiting.popleft()
            batch.on_replies(replies)
        while (reply := reader.gets()) is not False:
            if type(reply) is not _PUSH:
                raise InvalidResponse("Redis sent a reply nobody asked for")

    def eof_received(self) -> bool:
        return False  # close: connection_lost fails what is waiting

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stream_protocol.connection_lost(exc)
        self._fail(RedisConnectionError(f"Connection to Redis lost: {exc}" if exc else
                                        "Connection closed by server."))

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._waiting:
            return
        deadline = self._waiting[0].deadline
        if deadline > self._loop.time():
            self._timer = self._loop.call_at(deadline, self._check_deadline)
            return
        # The replies may still come: the connection is unusable, and everything behind the late batch waits
        # on it too.
        self._end(RedisTimeoutError(f"no reply from Redis within {self.timeout}s"))

    def _end(self, error: Exception) -> None:
        self._lost = True
        self._transport.abort()
        self._fail(error)

    def _fail(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, collections.deque()
        for batch in waiting:
            batch.on_replies(error)

    async def release(self) -> None:
        """Close the connection (failing what still waits) and give redis-py's connection back to its pool,
        which opens it afresh on its next use."""
        if not self._lost:
            self._end(RedisConnectionError("Connection to Redis closed by this client."))
        await self.connection.disconnect(nowait=True)


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
