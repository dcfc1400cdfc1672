-- quarantine: move a key that is not a session hash (every command on it fails with WRONGTYPE) out of the way,
-- kept for inspection, and off the dirty index, so calls on the session go on as if it were missing.
-- KEYS: session key, dirty index, quarantine key (one hash tag: one cluster slot)
-- ARGV: session_id
-- Returns {type, quarantine key} when the key was moved, or false when it is a hash or gone (nothing moved)
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'hash' or kind == 'none' then return false end
redis.call('RENAME', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[2], ARGV[1])
return {kind, KEYS[3]}
