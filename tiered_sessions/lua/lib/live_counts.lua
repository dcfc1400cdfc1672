-- Live-session counts of one partition, kept without a per-session index entry (a sorted-set entry per
-- session would cost about 150 bytes): a hash of expiry buckets, bucket = floor(expiry_ms / bucket_ms), to
-- how many live sessions expire in it, plus 'n' (the sum of the buckets), 'lo' (the buckets below it were
-- dropped: every session in them has expired) and 't' (sessions counted out, timed out or closed and removed,
-- that no cleanup has reported yet: timed_out.lua takes them). Scripts that create, remove or slide sessions
-- include this.

local function live_floor(counts)
  return tonumber(redis.call('HGET', counts, 'lo') or '0')
end

local function live_bump(counts, bucket, delta)
  local field = string.format('%d', bucket)  -- not the number: Redis would format it with '%.17g', slowly
  if redis.call('HINCRBY', counts, field, delta) == 0 then redis.call('HDEL', counts, field) end
end

-- A session becomes live (delta 1) or stops being live before its expiry (delta -1). Returns false if it
-- was counted out as expired already (nothing changed).
local function live_add(counts, bucket_ms, expires, delta)
  local bucket = math.floor(expires / bucket_ms)
  if bucket < live_floor(counts) then return false end
  live_bump(counts, bucket, delta)
  redis.call('HINCRBY', counts, 'n', delta)
  return true
end

-- A live session's expiry slides from one time to a later one.
local function live_move(counts, bucket_ms, from, to)
  local old, new = math.floor(from / bucket_ms), math.floor(to / bucket_ms)
  if old == new then return end
  if old < live_floor(counts) then  -- counted out already (another caller's clock ran ahead): count it again
    live_add(counts, bucket_ms, to, 1)
    return
  end
  live_bump(counts, old, -1)
  live_bump(counts, new, 1)
end

-- Drop the buckets that lie wholly before now, counting their sessions out as timed out ('t'); returns the
-- live sessions (those that expired within now's bucket still count: the count is exact to one bucket).
local function live_count(counts, bucket_ms, now)
  local fields = redis.call('HLEN', counts)
  if fields == 0 then return 0 end  -- no sessions yet: leave no key behind
  local current = math.floor(now / bucket_ms)
  local lo = live_floor(counts)
  if lo < current then
    -- Bookkeeping a full Redis must let through (readings, the session limit): the first write frees
    -- (docs/reliability.md, "A full Redis")
    redis.call('HDEL', counts, '')
    local dropped = 0
    if current - lo > 2 * fields then  -- a long gap since the last drop: look at the buckets there are
      local flat = redis.call('HGETALL', counts)
      for i = 1, #flat, 2 do
        local bucket = tonumber(flat[i])  -- nil for 'n' and 'lo'
        if bucket and bucket < current then
          dropped = dropped + tonumber(flat[i + 1])
          redis.call('HDEL', counts, flat[i])
        end
      end
    else
      for bucket = lo, current - 1 do
        local count = redis.call('HGET', counts, bucket)
        if count then
          dropped = dropped + tonumber(count)
          redis.call('HDEL', counts, bucket)
        end
      end
    end
    if dropped ~= 0 then
      redis.call('HINCRBY', counts, 'n', -dropped)
      redis.call('HINCRBY', counts, 't', dropped)
    end
    redis.call('HSET', counts, 'lo', current)
  end
  return tonumber(redis.call('HGET', counts, 'n') or '0')
end
