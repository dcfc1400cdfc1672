-- remove: replace the session by a versioned tombstone that the flusher persists (deletes stick).
-- KEYS: session hash, dirty index, live counts
-- ARGV: now_ms, session_id, persist, check_cold ("1": report a miss), min_version (from Postgres),
--       bucket_ms (of the live counts), journal version (or ''), [stale: "1" when a cleanup removes a closed
--       session: if this call counts it out of the live counts, it counts toward the next cleanup's report]
-- Returns 0 miss, -1 already a tombstone, -3 replayed already, or the tombstone's version
local current = redis.call('HMGET', KEYS[1], 'st', 'v', 'c', 'ex')
if not current[1] and ARGV[4] == '1' then return 0 end
if current[1] == 'x' then return -1 end
local journal = ARGV[7] or ''
-- Journal replay (the Postgres version after a write made while Redis was unreachable): apply it once, and
-- only to a copy that does not already include it ('jv': newest Postgres version folded in).
if journal ~= '' and tonumber(redis.call('HGET', KEYS[1], 'jv') or '0') >= tonumber(journal) then return -3 end
-- The DEL first: a remove frees memory, and a full Redis lets a script through whose first write frees
-- (docs/reliability.md, "A full Redis")
redis.call('DEL', KEYS[1])
if current[4] and tonumber(current[4]) > tonumber(ARGV[1]) then
  if live_add(KEYS[3], tonumber(ARGV[6]), tonumber(current[4]), -1) and ARGV[8] == '1' then
    redis.call('HINCRBY', KEYS[3], 't', 1)
  end
end
if ARGV[3] ~= '1' then return 1 end
local version = math.max(tonumber(current[2]) or 0, tonumber(ARGV[5])) + 1
redis.call('HSET', KEYS[1], 'v', version, 'st', 'x', 'c', current[3] or ARGV[1], 'la', ARGV[1], 'ex', ARGV[1],
  'jv', journal == '' and 0 or journal)
redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
return version
