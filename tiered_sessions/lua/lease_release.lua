-- lease_release: give a partition's lease back, only if it is still ours (compare-and-delete).
-- KEYS: lease key
-- ARGV: token
-- Returns 1 released, 0 not ours any more (expired, or taken by another flusher)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
