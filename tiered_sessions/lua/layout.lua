-- layout: record the tier's layout the first time a process starts on this Redis, and return it as recorded,
-- so that a process laid out otherwise refuses to start (see _layout.py).
-- KEYS: the layout key ('<prefix>:layout', a hash)
-- ARGV: name/value pairs of this process's layout
-- Returns the recorded layout as name/value pairs (this call's where none was recorded)
for i = 1, #ARGV, 2 do redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1]) end
return redis.call('HGETALL', KEYS[1])
