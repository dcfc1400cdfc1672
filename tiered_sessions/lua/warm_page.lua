-- warm_page: put many sessions of one partition, read from Postgres, back into Redis (recovery), each unless
-- Redis already has its key (a write got there first: its copy wins, as in warm.lua). One script call for
-- many sessions, and the partition's live counts bumped once per expiry bucket, not once per session.
-- KEYS: the partition's live counts, then each session's hash (one partition: one cluster slot)
-- ARGV: now_ms, bucket_ms (of the live counts), then per session, in KEYS' order: expires_ms, state code, n
--       (how many field and value items follow), the n items (field, value, ...; including v)
-- Returns how many sessions were written (absent before).
local now = tonumber(ARGV[1])
local bucket_ms = tonumber(ARGV[2])
local made_live = {}  -- expiry bucket -> sessions written live into it
local written = 0
local at = 3
for k = 2, #KEYS do
  local expires, state, n = ARGV[at], ARGV[at + 1], tonumber(ARGV[at + 2])
  local first, last = at + 3, at + 2 + n
  at = last + 1
  if redis.call('EXISTS', KEYS[k]) == 0 then
    if n < 4000 then
      redis.call('HSET', KEYS[k], unpack(ARGV, first, last))
    else  -- unpack() of thousands of arguments would overflow Lua's stack
      for i = first, last, 2 do redis.call('HSET', KEYS[k], ARGV[i], ARGV[i + 1]) end
    end
    redis.call('PEXPIREAT', KEYS[k], expires)
    written = written + 1
    local expiry = tonumber(expires)
    if state ~= 'x' and expiry > now then
      local bucket = math.floor(expiry / bucket_ms)
      made_live[bucket] = (made_live[bucket] or 0) + 1
    end
  end
end
-- As live_add, per bucket: a bucket the counts dropped already (its sessions counted out) is not counted.
local floor = live_floor(KEYS[1])
local counted = 0
for bucket, count in pairs(made_live) do
  if bucket >= floor then
    live_bump(KEYS[1], bucket, count)
    counted = counted + count
  end
end
if counted ~= 0 then redis.call('HINCRBY', KEYS[1], 'n', counted) end
return written
