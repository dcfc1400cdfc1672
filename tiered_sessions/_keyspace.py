"""Where the tier keeps what, in Redis: every key is built here. With ``p`` = crc32(session_id) % partitions,
one partition's keys share a Redis Cluster slot (the ``{pN}`` hash tag)::

    {prefix}:{p7}:s:<session_id>        hash: the session (see _codec.py for its fields)
    {prefix}:{p7}:dirty                 zset: session ids not yet in Postgres, scored by first-dirty time (ms)
    {prefix}:{p7}:expiring              hash: live sessions counted by expiry bucket, and those counted out
                                        since the last cleanup (lua/lib/live_counts.lua)
    {prefix}:{p7}:lease                 string: the token of the flusher that owns the partition (PX lease)
    {prefix}:{p7}:dead                  hash: dead letters (rows Postgres rejected, quarantined keys) by id
    {prefix}:{p7}:quarantine:<id>       a key that was not a session hash, moved aside by claim.lua
    {prefix}:{p7}:lock:<id>, fence:<id> a session's lock and its fencing counter (locks.py)
    {prefix}:flushers                   zset: flusher ids scored by last heartbeat (ms), for the fair share
    {prefix}:layout                     hash: the layout every process checks (_layout.py)

Nothing else is kept per session: a per-session index entry (a sorted-set member) would cost about as much
as a small session's own hash. Listing scans the session keys; the per-user listing asks Postgres.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from ._codec import partition_of


class SessionKeys(NamedTuple):  # a tuple: built on every call, and cheaper to build than a dataclass
    partition: int
    session: str
    dirty: str
    counts: str


def _in_partition(suffix: str) -> Callable[[KeySpace, int], str]:
    """A key (or key prefix) of one partition: ``{prefix}:{pN}:<suffix>``."""

    def key(self: KeySpace, partition: int) -> str:
        return self.partition_prefix(partition) + suffix

    return key


class KeySpace:
    session_key_prefix = _in_partition("s:")
    dirty_key = _in_partition("dirty")
    counts_key = _in_partition("expiring")
    lease_key = _in_partition("lease")
    dead_letters_key = _in_partition("dead")
    quarantine_key_prefix = _in_partition("quarantine:")  # where claim.lua moves a key that is not a session hash

    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self.layout_key = f"{prefix}:layout"
        self.flushers_key = f"{prefix}:flushers"
        self.counts_keys = [self.counts_key(p) for p in range(partitions)]
        # Per partition: the session key prefix, the dirty index and the live counts (what keys() puts together).
        self._partition_keys = [(self.session_key_prefix(p), self.dirty_key(p), self.counts_key(p))
                                for p in range(partitions)]

    def partition_prefix(self, partition: int) -> str:
        return f"{self.prefix}:{{p{partition}}}:"

    def keys(self, session_id: str) -> SessionKeys:
        partition = partition_of(session_id, self.partitions)
        session_prefix, dirty, counts = self._partition_keys[partition]
        return SessionKeys(partition, session_prefix + session_id, dirty, counts)

    @property
    def session_key_pattern(self) -> str:
        """Matches every session key (SCAN): ids cannot hold "}", so nothing else matches."""
        return f"{self.prefix}:{{p*}}:s:*"

    def lock_keys(self, session_id: str) -> tuple[str, str]:
        """The session's lock and its fencing counter."""
        prefix = self.partition_prefix(partition_of(session_id, self.partitions))
        return prefix + "lock:" + session_id, prefix + "fence:" + session_id
