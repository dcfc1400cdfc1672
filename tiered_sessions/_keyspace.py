"""Where the tier keeps what, in Redis: every key is built here. With ``p`` = crc32(session_id) % partitions,
one partition's keys share a Redis Cluster slot (the ``{pN}`` hash tag)::

    {prefix}:{p7}:s:<session_id>        hash: the session (see _codec.py for its fields)
    {prefix}:{p7}:dirty                 zset: session ids not yet in Postgres, scored by first-dirty time (ms)
    {prefix}:{p7}:expiring              hash: live sessions counted by expiry bucket (lua/lib/live_counts.lua)
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

from typing import NamedTuple

from ._codec import partition_of


class SessionKeys(NamedTuple):  # a tuple: built on every call, and cheaper to build than a dataclass
    partition: int
    session: str
    dirty: str
    counts: str


class KeySpace:
    def __init__(self, prefix: str, partitions: int) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self.counts_keys = [self.counts_key(p) for p in range(partitions)]
        # Per partition: the session key prefix, the dirty index and the live counts (what keys() puts together).
        self._partition_keys = [(self.session_key_prefix(p), self.dirty_key(p), self.counts_key(p))
                                for p in range(partitions)]

    def partition_prefix(self, partition: int) -> str:
        return f"{self.prefix}:{{p{partition}}}:"

    def session_key_prefix(self, partition: int) -> str:
        return self.partition_prefix(partition) + "s:"

    def quarantine_key_prefix(self, partition: int) -> str:
        """Where claim.lua moves a key that is not a session hash (``{prefix}:{pN}:quarantine:<id>``)."""
        return self.partition_prefix(partition) + "quarantine:"

    def dirty_key(self, partition: int) -> str:
        return self.partition_prefix(partition) + "dirty"

    def counts_key(self, partition: int) -> str:
        return self.partition_prefix(partition) + "expiring"

    def dead_letters_key(self, partition: int) -> str:
        return self.partition_prefix(partition) + "dead"

    def lease_key(self, partition: int) -> str:
        return self.partition_prefix(partition) + "lease"

    @property
    def layout_key(self) -> str:
        return f"{self.prefix}:layout"

    @property
    def flushers_key(self) -> str:
        return f"{self.prefix}:flushers"

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
