-- lease: take a partition's flusher lease if it is free, or renew it if it is ours.
-- KEYS: lease key ('{prefix}:{pN}:lease', the partition's slot)
-- ARGV: token (the flusher's id), lease_ms
-- Returns 1 held (taken or renewed), 0 held by another flusher
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
