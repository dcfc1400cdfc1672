"""The tier's layout: what every process sharing a Redis and a sessions table must agree on. The first process
records it in both (Redis ``<key prefix>:layout``, Postgres ``<table>_layout``); every later one checks it and
refuses to start on a difference, naming both values, instead of writing where no flusher looks."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from .errors import LayoutMismatch

# The Redis key layout this code reads and writes (``{prefix}:{pN}:s:<id>`` and the partition keys beside it).
LAYOUT_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class Layout:
    partitions: int
    key_prefix: str
    version: int = LAYOUT_VERSION

    def record(self) -> dict[str, str]:
        return {"layout": str(self.version), "partitions": str(self.partitions), "key_prefix": self.key_prefix}

    def check(self, recorded: Mapping[str, str], where: str) -> None:
        """Raise LayoutMismatch (a ConfigurationError) if ``recorded`` (as read from ``where``) differs."""
        ours = self.record()
        for name, setting in (("partitions", "TIERED_SESSIONS_PARTITIONS (--partitions)"),
                              ("key_prefix", "TIERED_SESSIONS_KEY_PREFIX (--key-prefix)"),
                              ("layout", "the tiered_sessions version")):
            theirs = recorded.get(name)
            if theirs is not None and theirs != ours[name]:
                raise LayoutMismatch(
                    f"the tier was laid out with {name} {theirs} ({where}), this process is configured with "
                    f"{ours[name]}: every process sharing it needs the same {setting}")
