-- warm: put a session read from Postgres back into Redis, unless a write got there first.
-- KEYS: session hash, live counts
-- ARGV: session_id, expires_ms, now_ms, bucket_ms (of the live counts), then field/value pairs (including v)
-- Returns {1} when written (the hash is the pairs sent: the caller has it), {0, hash...} when Redis already
-- had the key (its copy wins)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {0, redis.call('HGETALL', KEYS[1])}
end
if #ARGV < 4000 then
  redis.call('HSET', KEYS[1], unpack(ARGV, 5))
else  -- unpack() of thousands of arguments would overflow Lua's stack
  for i = 5, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
local expires = tonumber(ARGV[2])
if redis.call('HGET', KEYS[1], 'st') ~= 'x' and expires > tonumber(ARGV[3]) then
  live_add(KEYS[2], tonumber(ARGV[4]), expires, 1)
end
return {1}
