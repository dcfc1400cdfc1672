-- redirty: mark a session dirty again, for a whole-row write (dead-letter replay, an activity row that
-- found no row in Postgres), pinning it until the flusher acks.
-- KEYS: session hash, dirty index
-- ARGV: now_ms, session_id
-- Returns 1 if marked, 0 if the session is not in Redis
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[1], 'k')  -- Postgres may lack what is here: the next flush writes the whole row
redis.call('PERSIST', KEYS[1])
return 1
