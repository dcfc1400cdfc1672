-- unlock: delete the lock only if it still holds our token; after our lease ran out it may be someone else's.
-- KEYS: lock key
-- ARGV: token
-- Returns 1 released, 0 not ours any more (expired, or taken by another holder)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
