-- update_activity: bump counters, slide the expiry, mark dirty. One round trip, no read-modify-write.
-- KEYS: session hash, dirty index, live index
-- ARGV: now_ms, timeout_ms, duration_ms, session_id, persist ("1": write-behind on, pin until flushed),
--       [journal version]
-- Returns 0 (not in Redis: caller may read through), -1 (gone: removed, closed or expired), -3 (replayed
-- already), or {version, requests, duration}
local state_and_expiry = redis.call('HMGET', KEYS[1], 'st', 'ex')
if not state_and_expiry[1] then return 0 end
local now = tonumber(ARGV[1])
if state_and_expiry[1] ~= 'a' or tonumber(state_and_expiry[2]) <= now then return -1 end
-- Journal replay (ARGV[6]: the Postgres version after a write made while Redis was unreachable): apply it
-- once, and only to a copy that does not already include it ('jv': newest Postgres version folded in).
if ARGV[6] and ARGV[6] ~= '' then
  if tonumber(redis.call('HGET', KEYS[1], 'jv') or '0') >= tonumber(ARGV[6]) then return -3 end
  redis.call('HSET', KEYS[1], 'jv', ARGV[6])
end
local expires = now + tonumber(ARGV[2])
local version = redis.call('HINCRBY', KEYS[1], 'v', 1)
local requests = redis.call('HINCRBY', KEYS[1], 'rc', 1)
local duration = redis.call('HINCRBY', KEYS[1], 'td', ARGV[3])
redis.call('HSET', KEYS[1], 'la', ARGV[1], 'ex', expires)
redis.call('ZADD', KEYS[3], expires, ARGV[4])
if ARGV[5] == '1' then
  -- pinned while dirty: the flusher's ack applies the real expiry
  redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[4])
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], expires)
end
return {version, requests, duration}
