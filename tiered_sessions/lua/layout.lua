-- layout: record the tier's layout the first time a process starts on this Redis, and return it as recorded,
-- so that a process laid out otherwise refuses to start (see _layout.py).
-- KEYS: the layout key ('<prefix>:layout', a hash)
-- ARGV: name/value pairs of this process's layout
-- Returns the recorded layout as name/value pairs (this call's where none was recorded)
-- Written only where missing: a process that starts on a full Redis writes nothing (docs/reliability.md)
for i = 1, #ARGV, 2 do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 0 then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HGETALL', KEYS[1])
