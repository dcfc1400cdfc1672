-- lock: take a session's lock lease if nobody holds it, with a fencing token above every token issued before.
-- KEYS: lock key, fence key (both in the session's partition, so in its Redis Cluster slot)
-- ARGV: lease_ms, fence_ttl_ms
-- Returns the token (> 0), or minus the holder's remaining lease in ms (<= -1) when the lock is taken.
local left = redis.call('PTTL', KEYS[1])
if left ~= -2 then
  if left < 1 then left = 1 end  -- -1 (no expiry) cannot happen: every lock key is written with PX
  return -left
end
-- The token is the last one + 1, but at least the server clock in microseconds: it keeps growing even after
-- the fence key expired (idle session) or was lost in a failover to a replica that had not seen it.
local clock = redis.call('TIME')
local token = math.max((tonumber(redis.call('GET', KEYS[2])) or 0) + 1,
                       tonumber(clock[1]) * 1000000 + tonumber(clock[2]))
local text = string.format('%.0f', token)  -- tostring() would print 1.7e+15
redis.call('SET', KEYS[2], text, 'PX', ARGV[2])
redis.call('SET', KEYS[1], text, 'NX', 'PX', ARGV[1])
return token
