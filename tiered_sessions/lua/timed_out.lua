-- timed_out: how many sessions of one partition were counted out (timed out, or closed and removed by a
-- cleanup) since any process last asked, each reported once (see lib/live_counts.lua: dropping a passed
-- bucket adds its sessions to 't'; this takes 't').
-- KEYS: the partition's live counts
-- ARGV: now_ms, bucket_ms
-- Returns that number (sessions that expired within now's bucket are counted by a later call)
live_count(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[1]))
local counted = tonumber(redis.call('HGET', KEYS[1], 't') or '0')
if counted ~= 0 then redis.call('HDEL', KEYS[1], 't') end
return counted
