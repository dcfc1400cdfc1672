"""The alternatives each scenario is compared with, one small honest implementation per module:

- ``redis_py``: sessions as JSON strings in Redis, SET with EX / GET through redis-py asyncio (hiredis,
  a blocking pool of 64 connections: the same client settings as ours).
- ``write_through``: every update an ``INSERT ... ON CONFLICT DO UPDATE`` of the full row, through an asyncpg
  pool of 32 connections (the seed's design, without its global lock and blocking client).
- ``unnest``: 1000-row ``unnest`` batch upserts on one asyncpg connection: the flusher's ceiling.
- ``raw_pair``: asyncpg and redis-py side by side, no scripts: cache-aside reads and recovery.
"""
