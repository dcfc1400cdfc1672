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
-- The cleared ids leave the index in one ZREM per few hundred, not one each (unpack() of many more would
-- overflow Lua's stack)
local cleared, pending = 0, {}
local function clear(id)
  cleared = cleared + 1
  pending[#pending + 1] = id
  if #pending == 500 then
    redis.call('ZREM', KEYS[1], unpack(pending))
    pending = {}
  end
end
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  local key = ARGV[1] .. id
  local current = redis.call('HMGET', key, 'v', 'st', 'ex')
  if not current[1] then
    clear(id)
  elseif current[1] == ARGV[i + 1] then
    clear(id)
    if current[2] == 'x' then
      redis.call('PEXPIRE', key, ARGV[2])
    else
      -- before the expiry: a PEXPIREAT in the past deletes the key, and an HSET after it would recreate it
      if ARGV[i + 2] == '1' then redis.call('HSET', key, 'k', '1') end
      redis.call('PEXPIREAT', key, current[3])
    end
  else
    -- written again after the read: what Postgres lacks is at most as old as the read
    redis.call('ZADD', KEYS[1], 'XX', ARGV[3], id)
  end
end
if #pending > 0 then redis.call('ZREM', KEYS[1], unpack(pending)) end
return cleared
