-- ack: after Postgres holds a version, clear the dirty mark only if that is still the version in Redis,
-- and apply the real expiry (tombstones linger tombstone_ttl so a slow read-through cannot resurrect).
-- Fencing: only the partition's lease holder may ack; a flusher that lost its lease gets -1 and clears nothing
-- (its Postgres write was harmless: the version guard). A token '?<id>' (an on-demand flush(), which needs no
-- lease) is accepted while <id> holds the lease or nobody does.
-- KEYS: dirty index, lease key (both in the partition's slot)
-- ARGV: session key prefix, tombstone_ttl_ms, read_ms, lease token, then id/version/kept triples (kept '1':
--       Postgres now holds that version whole, so while only touches follow, claim.lua sends activity rows)
-- Returns the number of entries cleared, or -1 when the lease is not ours
local holder = redis.call('GET', KEYS[2])
if string.sub(ARGV[4], 1, 1) == '?' then
  if holder and holder ~= string.sub(ARGV[4], 2) then return -1 end
elseif holder ~= ARGV[4] then
  return -1
end
-- Reads first, then the writes, the cleared ids leaving the index first: a full Redis lets a script through
-- whose first write frees, and an ack is what frees it (docs/reliability.md, "A full Redis").
local cleared, settle, again = {}, {}, {}
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  local current = redis.call('HMGET', key, 'v', 'st', 'ex')
  if not current[1] then
    cleared[#cleared + 1] = id
  elseif current[1] == ARGV[i + 1] then
    cleared[#cleared + 1] = id
    settle[#settle + 1] = {key, current[2] == 'x', current[3], ARGV[i + 2] == '1'}
  else
    again[#again + 1] = id  -- written again after the read: what Postgres lacks is at most as old as the read
  end
end
-- One ZREM per few hundred ids, not one each (unpack() of many more would overflow Lua's stack)
for first = 1, #cleared, 500 do
  redis.call('ZREM', KEYS[1], unpack(cleared, first, math.min(first + 499, #cleared)))
end
for _, entry in ipairs(settle) do
  local key, tombstone, expires, kept = entry[1], entry[2], entry[3], entry[4]
  if tombstone then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    -- before the expiry: a PEXPIREAT in the past deletes the key, and an HSET after it would recreate it
    if kept then redis.call('HSET', key, 'k', '1') end
    redis.call('PEXPIREAT', key, expires)
  end
end
for _, id in ipairs(again) do redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id) end
return #cleared
