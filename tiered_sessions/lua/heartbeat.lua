-- heartbeat: record that a flusher is alive, forget those silent for too long, and list those alive.
-- KEYS: the flushers zset ('<prefix>:flushers')
-- ARGV: flusher id, now_ms, alive since (ms: those seen since are alive), forget before (ms)
-- Returns the ids of the flushers alive
-- The forgetting first: a full Redis lets a script through whose first write frees, and a flusher must keep
-- its place while Redis is full, since flushing is what frees it (docs/reliability.md, "A full Redis").
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[4])
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return redis.call('ZRANGEBYSCORE', KEYS[1], ARGV[3], '+inf')
