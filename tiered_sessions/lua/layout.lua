-- layout: record the tier's key layout the first time a process starts on this Redis, and return it as
-- recorded, so a process laid out otherwise (another partition count) refuses to start instead of writing
-- where no flusher looks.
-- KEYS: the layout key ('<prefix>:layout', a hash)
-- ARGV: layout version, partitions
-- Returns {layout version, partitions} as recorded (this call's when it was the first)
redis.call('HSETNX', KEYS[1], 'layout', ARGV[1])
redis.call('HSETNX', KEYS[1], 'partitions', ARGV[2])
return redis.call('HMGET', KEYS[1], 'layout', 'partitions')
