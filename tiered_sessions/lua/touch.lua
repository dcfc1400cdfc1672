-- update_activity of one or many sessions: bump counters, slide the expiry, mark dirty (atomically: a script).
-- Calls made in the same event-loop turn come as one script call, so Redis pays its per-script cost once.
-- KEYS: each session's hash, '<partition prefix>s:<id>': the id, and the partition's dirty index and live
--       counts (same hash tag, so same cluster slot), are read off it, which keeps each call to two items;
--       with layout "1", then that one partition's dirty index and live counts, declared; with layout "2",
--       none: the sessions' keys come in ARGV (_combining.py)
-- ARGV: timeout_ms, persist ("1": write-behind on, pin until flushed), bucket_ms (of the live counts),
--       journal ("1": journal replays, each call carries the Postgres version after a write made while Redis
--       was unreachable), counters ("1": reply with them), layout ("0" one Redis, "1" one cluster slot, keys
--       declared, "2" several slots of one master, keys probed first: see _combining.py), now_ms (when the
--       calls were sent: they share it), [layout "2": the number of sessions, their keys], then per session:
--       duration_ms[, journal version]
-- Returns one reply per session: 0 (not in Redis: caller may read through), -1 (gone: removed, closed or
-- expired), -3 (replayed already), the new version, or {version, requests, duration, now_ms} when counters
-- are asked for; or an error for that session alone. With layout "2", while a slot moves: TRYAGAIN, having
-- written nothing.
-- Numbers go to redis.call as strings made once here: Redis formats a Lua number with '%.17g' on every call,
-- a measurable share of a touch.
local timeout = tonumber(ARGV[1])
local persist = ARGV[2] == '1'
local bucket_ms = tonumber(ARGV[3])
local stride = ARGV[4] == '1' and 2 or 1
local counters = ARGV[5] == '1'
local declared = ARGV[6] == '1'
local probed = ARGV[6] == '2'
local now_ms = ARGV[7]
local now = tonumber(now_ms)
local expires = now + timeout
local expires_ms = string.format('%d', expires)

local session_keys, sessions, first = KEYS, #KEYS, 8  -- first: the first session's own ARGV
if declared then
  sessions = #KEYS - 2
elseif probed then
  sessions = tonumber(ARGV[8])
  session_keys = {unpack(ARGV, 9, 8 + sessions)}
  first = 9 + sessions
end
local dirty_key, counts_key = KEYS[#KEYS - 1], KEYS[#KEYS]

-- Several slots: every key a touch writes is looked up before anything is written. One in a slot that is
-- moving (or a cluster that is down) is refused by Redis; refused midway, the touches before it would stay.
if probed then
  local seen = {}
  for i = 1, sessions do
    local session = session_keys[i]
    local prefix = string.sub(session, 1, string.find(session, '}:s:', 1, true) + 1)
    local keys = seen[prefix] and {session} or {session, prefix .. 'dirty', prefix .. 'expiring'}
    seen[prefix] = true
    for _, key in ipairs(keys) do
      local reply = redis.pcall('EXISTS', key)
      if type(reply) == 'table' and reply.err then
        return redis.error_reply('TRYAGAIN a slot of this call is not served here now: ' .. reply.err)
      end
    end
  end
end

local function touch(session, duration, journal)
  local at = string.find(session, '}:s:', 1, true)
  local id = string.sub(session, at + 4)
  if not declared then
    local prefix = string.sub(session, 1, at + 1)
    dirty_key, counts_key = prefix .. 'dirty', prefix .. 'expiring'
  end
  -- One read and one write of the hash: every command a script runs is also one more for the replicas.
  local state_and_expiry = redis.call('HMGET', session, 'st', 'ex', 'v', 'rc', 'td')
  if not state_and_expiry[1] then return 0 end
  local old_expiry = tonumber(state_and_expiry[2])
  if state_and_expiry[1] ~= 'a' or old_expiry <= now then return -1 end
  -- Journal replay: apply it once, and only to a copy that does not already include it ('jv': newest
  -- Postgres version folded in).
  if journal then
    if tonumber(redis.call('HGET', session, 'jv') or '0') >= tonumber(journal) then return -3 end
    redis.call('HSET', session, 'jv', journal)
  end
  local version = tonumber(state_and_expiry[3]) + 1
  local requests = tonumber(state_and_expiry[4] or '0') + 1
  local total = tonumber(state_and_expiry[5] or '0') + tonumber(duration)
  redis.call('HSET', session, 'v', string.format('%d', version), 'rc', string.format('%d', requests),
             'td', string.format('%d', total), 'la', now_ms, 'ex', expires_ms)
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
  local a = first + stride * (i - 1)
  local ok, reply = pcall(touch, session_keys[i], ARGV[a], stride == 2 and ARGV[a + 1] or nil)
  if ok then
    replies[i] = reply
  else
    -- one session's error (a key of the wrong type) fails that call only
    replies[i] = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
end
return replies
