-- lease: take a partition's flusher lease if it is free, or renew it if it is ours.
-- KEYS: lease key ('{prefix}:{pN}:lease', the partition's slot)
-- ARGV: token (the flusher's id), lease_ms
-- Returns 1 held (taken or renewed), 0 held by another flusher
-- A full Redis must let a flusher take its leases (flushing is what frees it): the first write is one that
-- frees, a DEL of the absent key (docs/reliability.md, "A full Redis").
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if holder then return 0 end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
