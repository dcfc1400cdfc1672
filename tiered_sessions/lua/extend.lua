-- extend: give our lock a fresh lease, only if it still holds our token.
-- KEYS: lock key
-- ARGV: token, lease_ms
-- Returns 1 extended, 0 not ours any more (expired, or taken by another holder)
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
