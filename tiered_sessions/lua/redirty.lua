-- redirty: mark a session dirty again, for a whole-row write (dead-letter replay, an activity row that
-- found no row in Postgres, a row the version guard refused), pinning it until the flusher acks.
-- KEYS: session hash, dirty index
-- ARGV: now_ms, session_id, [above]: the version Postgres holds, when it refused this copy's: the copy is
--       rebased to the next version above it (and above its own), so its next flush is taken. Its journal
--       mark ('jv') stays: journaled writes it lacks are still replayed onto it.
-- Returns {version after the call, 1 if rebased else 0}, or 0 if the session is not in Redis
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local version = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
local above = tonumber(ARGV[3] or '')
local rebased = 0
if above and version <= above then
  version, rebased = above + 1, 1
  redis.call('HSET', KEYS[1], 'v', version)
end
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], 'k')  -- Postgres may lack what is here: the next flush writes the whole row
redis.call('PERSIST', KEYS[1])
return {version, rebased}
