-- update_activity of one or many sessions: bump counters, slide the expiry, mark dirty. No read-modify-write.
-- Calls made in the same event-loop turn come as one script call, so Redis pays its per-script cost once.
-- KEYS: each session's hash, '<partition prefix>s:<id>': the id, and the partition's dirty index and live
--       counts (same hash tag, so same cluster slot), are read off it, which keeps each call to two items;
--       with declared = "1", then that one partition's dirty index and live counts. A Redis Cluster needs
--       them declared: it checks declared keys before the script runs (ASK, TRYAGAIN while the slot moves),
--       and fails an undeclared one midway, after the session's writes.
-- ARGV: timeout_ms, persist ("1": write-behind on, pin until flushed), bucket_ms (of the live counts),
--       journal ("1": journal replays, each call carries the Postgres version after a write made while Redis
--       was unreachable), counters ("1": reply with them), declared (see KEYS), now_ms (when the calls were
--       sent: they share it), then per session: duration_ms[, journal version]
-- Returns one reply per session: 0 (not in Redis: caller may read through), -1 (gone: removed, closed or
-- expired), -3 (replayed already), the new version, or {version, requests, duration, now_ms} when counters
-- are asked for; or an error for that session alone.
-- Numbers go to redis.call as strings made once here: Redis formats a Lua number with '%.17g' on every call,
-- a measurable share of a touch.
local timeout = tonumber(ARGV[1])
local persist = ARGV[2] == '1'
local bucket_ms = tonumber(ARGV[3])
local stride = ARGV[4] == '1' and 2 or 1
local counters = ARGV[5] == '1'
local declared = ARGV[6] == '1'
local now_ms = ARGV[7]
local now = tonumber(now_ms)
local expires = now + timeout
local expires_ms = string.format('%d', expires)

local sessions = declared and #KEYS - 2 or #KEYS
local dirty_key, counts_key = KEYS[#KEYS - 1], KEYS[#KEYS]

local function touch(session, duration, journal)
  local at = string.find(session, '}:s:', 1, true)
  local id = string.sub(session, at + 4)
  if not declared then
    local prefix = string.sub(session, 1, at + 1)
    dirty_key, counts_key = prefix .. 'dirty', prefix .. 'expiring'
  end
  local state_and_expiry = redis.call('HMGET', session, 'st', 'ex')
  if not state_and_expiry[1] then return 0 end
  local old_expiry = tonumber(state_and_expiry[2])
  if state_and_expiry[1] ~= 'a' or old_expiry <= now then return -1 end
  -- Journal replay: apply it once, and only to a copy that does not already include it ('jv': newest
  -- Postgres version folded in).
  if journal then
    if tonumber(redis.call('HGET', session, 'jv') or '0') >= tonumber(journal) then return -3 end
    redis.call('HSET', session, 'jv', journal)
  end
  local version = redis.call('HINCRBY', session, 'v', '1')
  local requests = redis.call('HINCRBY', session, 'rc', '1')
  local total = redis.call('HINCRBY', session, 'td', duration)
  redis.call('HSET', session, 'la', now_ms, 'ex', expires_ms)
  live_move(counts_key, bucket_ms, old_expiry, expires)
  if persist then
    -- pinned while dirty: the flusher's ack applies the real expiry
    redis.call('ZADD', dirty_key, 'NX', now_ms, id)
    redis.call('PERSIST', session)
  else
    redis.call('PEXPIREAT', session, expires_ms)
  end
  if counters then return {version, requests, total, now} end
  return version
end

local replies = {}
for i = 1, sessions do
  local a = 8 + stride * (i - 1)
  local ok, reply = pcall(touch, KEYS[i], ARGV[a], stride == 2 and ARGV[a + 1] or nil)
  if ok then
    replies[i] = reply
  else
    -- one session's error (a key of the wrong type) fails that call only
    replies[i] = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
end
return replies
