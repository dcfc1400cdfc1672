-- update_activity of one or many sessions: bump counters, slide the expiry, mark dirty. No read-modify-write.
-- Calls made in the same event-loop turn come as one script call, so Redis pays its per-script cost once.
-- KEYS: per session: session hash, dirty index, live counts
-- ARGV: timeout_ms, persist ("1": write-behind on, pin until flushed), bucket_ms (of the live counts),
--       then per session: now_ms, duration_ms, session_id, journal version ('' when not a journal replay)
-- Returns one reply per session: 0 (not in Redis: caller may read through), -1 (gone: removed, closed or
-- expired), -3 (replayed already), {version, requests, duration}, or an error for that session alone.
local timeout = tonumber(ARGV[1])
local persist = ARGV[2] == '1'
local bucket_ms = tonumber(ARGV[3])

local function touch(session, dirty, counts, now_ms, duration, id, journal)
  local state_and_expiry = redis.call('HMGET', session, 'st', 'ex')
  if not state_and_expiry[1] then return 0 end
  local now = tonumber(now_ms)
  local old_expiry = tonumber(state_and_expiry[2])
  if state_and_expiry[1] ~= 'a' or old_expiry <= now then return -1 end
  -- Journal replay (the Postgres version after a write made while Redis was unreachable): apply it once, and
  -- only to a copy that does not already include it ('jv': newest Postgres version folded in).
  if journal ~= '' then
    if tonumber(redis.call('HGET', session, 'jv') or '0') >= tonumber(journal) then return -3 end
    redis.call('HSET', session, 'jv', journal)
  end
  local expires = now + timeout
  local version = redis.call('HINCRBY', session, 'v', 1)
  local requests = redis.call('HINCRBY', session, 'rc', 1)
  local total = redis.call('HINCRBY', session, 'td', duration)
  redis.call('HSET', session, 'la', now_ms, 'ex', expires)
  live_move(counts, bucket_ms, old_expiry, expires)
  if persist then
    -- pinned while dirty: the flusher's ack applies the real expiry
    redis.call('ZADD', dirty, 'NX', now_ms, id)
    redis.call('PERSIST', session)
  else
    redis.call('PEXPIREAT', session, expires)
  end
  return {version, requests, total}
end

local replies = {}
for i = 1, #KEYS / 3 do
  local k, a = 3 * i - 2, 4 * i
  local ok, reply = pcall(touch, KEYS[k], KEYS[k + 1], KEYS[k + 2], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  if ok then
    replies[i] = reply
  else
    -- one session's error (a key of the wrong type) fails that call only
    replies[i] = redis.error_reply(type(reply) == 'table' and reply.err or tostring(reply))
  end
end
return replies
