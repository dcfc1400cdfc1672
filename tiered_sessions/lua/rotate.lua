-- rotate: move a live session to a new id (same partition, so one script and one cluster slot), and
-- tombstone the old id so it never works again. Data, counters and expiry move with it.
-- KEYS: old session hash, new session hash, dirty index (the live count does not change: one for one)
-- ARGV: now_ms, old_id, new_id, persist
-- Returns 0 old id not in Redis (caller may read through), -1 old id gone, -2 new id taken, or the new hash
local now = tonumber(ARGV[1])
local old = redis.call('HGETALL', KEYS[1])
if #old == 0 then return 0 end
local fields = {}
for i = 1, #old, 2 do fields[old[i]] = old[i + 1] end
if fields['st'] == 'x' or tonumber(fields['ex']) <= now then return -1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return -2 end
local version = tonumber(fields['v']) + 1
for i = 1, #old, 2 do
  -- not 'k': Postgres has no row for the new id yet
  if old[i] ~= 'jv' and old[i] ~= 'k' then redis.call('HSET', KEYS[2], old[i], old[i + 1]) end
end
redis.call('HSET', KEYS[2], 'v', version)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'v', version, 'st', 'x', 'c', fields['c'], 'la', ARGV[1], 'ex', ARGV[1])
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[3], 'NX', ARGV[1], ARGV[2])
  redis.call('ZADD', KEYS[3], 'NX', ARGV[1], ARGV[3])
else
  redis.call('DEL', KEYS[1])
  redis.call('PEXPIREAT', KEYS[2], fields['ex'])
end
return redis.call('HGETALL', KEYS[2])
