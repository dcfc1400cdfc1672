-- live_count: how many sessions of one partition are live (see lib/live_counts.lua).
-- KEYS: the partition's live counts
-- ARGV: now_ms, bucket_ms
return live_count(KEYS[1], tonumber(ARGV[2]), tonumber(ARGV[1]))
