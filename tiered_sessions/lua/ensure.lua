-- ensure: return the live session, or create a new one (a new life above any older version).
-- KEYS: session hash, dirty index, live counts, then every partition's live counts (for the session limit)
-- ARGV: now_ms, timeout_ms, session_id, persist, check_cold ("1": report a miss instead of creating),
--       min_version (from Postgres), max_sessions (0: no limit; -n: the caller counted n live sessions, at or
--       over the limit: a Redis Cluster cannot count other partitions' slots here), size, bucket_ms (of the
--       live counts), then field/value pairs
-- Returns {1, hash...} existing, {2, hash...} created, {0} miss (caller reads Postgres first), {-1, count} over limit
-- At maxmemory (noeviction) Redis refuses a script's first write if it may grow memory, and lets every write
-- after a first one through (to keep the script atomic): a script that grows memory starts with such a write,
-- never with a DEL, so that a full Redis refuses it whole (RedisFull).
local now = tonumber(ARGV[1])
local bucket_ms = tonumber(ARGV[9])
local current = redis.call('HMGET', KEYS[1], 'st', 'ex', 'v')
if current[1] and current[1] ~= 'x' and tonumber(current[2]) > now then
  return {1, redis.call('HGETALL', KEYS[1])}
end
if not current[1] and ARGV[5] == '1' then return {0} end
local max_sessions = tonumber(ARGV[7])
if max_sessions < 0 then return {-1, -max_sessions} end
if max_sessions > 0 then
  local live = 0
  for i = 4, #KEYS do live = live + live_count(KEYS[i], bucket_ms, now) end
  if live >= max_sessions then return {-1, live} end
end
local version = math.max(tonumber(current[3]) or 0, tonumber(ARGV[6])) + 1
local expires = now + tonumber(ARGV[2])
if current[1] or current[3] then  -- a new life over a tombstone or an expired copy: the HSET first
  redis.call('HSET', KEYS[1], 'v', version)
  redis.call('DEL', KEYS[1])
end
redis.call('HSET', KEYS[1], 'v', version, 'st', 'a', 'c', ARGV[1], 'la', ARGV[1], 'ex', expires,
  'rc', 0, 'td', 0, 'sz', ARGV[8])
for i = 10, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
live_add(KEYS[3], bucket_ms, expires, 1)
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[3])
else
  redis.call('PEXPIREAT', KEYS[1], expires)
end
return {2, redis.call('HGETALL', KEYS[1])}
