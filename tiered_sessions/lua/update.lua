-- update: set and delete data/metadata keys and set attributes, atomically, within the size limit.
-- KEYS: session hash, dirty index
-- ARGV: [1] now_ms, [2] session_id, [3] max_bytes, [4] persist, [5] state ('' keeps it),
--       [6] n_set, [7] journal version ('' outside replay), [8] expected version ('' for any),
--       [9] n_unset, [10] n_guard, then n_set field/value pairs, n_unset fields,
--       n_guard field/expected-value pairs (expected '' = absent), then attribute field/value pairs
-- Returns 0 miss, -1 gone, -3 replayed already, {-2, size} too large, {-4} a guarded field changed,
-- {-5, version} version conflict (nothing written in any of these), or {version, size}
local current = redis.call('HMGET', KEYS[1], 'st', 'ex', 'sz', 'v')
if not current[1] then return 0 end
if current[1] == 'x' or tonumber(current[2]) <= tonumber(ARGV[1]) then return -1 end
if ARGV[8] ~= '' and current[4] ~= ARGV[8] then return {-5, tonumber(current[4])} end
local n_set, n_unset, n_guard = tonumber(ARGV[6]), tonumber(ARGV[9]), tonumber(ARGV[10])
local sets, unsets, guards = 11, 11 + 2 * n_set, 11 + 2 * n_set + n_unset
local attributes = guards + 2 * n_guard
-- Nested paths were computed by the caller from these fields: if one changed since, it must recompute.
for i = guards, attributes - 1, 2 do
  if (redis.call('HGET', KEYS[1], ARGV[i]) or '') ~= ARGV[i + 1] then return {-4} end
end
local size = tonumber(current[3]) or 0
for i = sets, unsets - 1, 2 do
  local old = redis.call('HSTRLEN', KEYS[1], ARGV[i])
  if old > 0 then size = size + #ARGV[i + 1] - old else size = size + #ARGV[i] + #ARGV[i + 1] end
end
for i = unsets, guards - 1 do
  local old = redis.call('HSTRLEN', KEYS[1], ARGV[i])
  if old > 0 then size = size - #ARGV[i] - old end
end
if size > tonumber(ARGV[3]) then return {-2, size} end
-- Journal replay (ARGV[7]: the Postgres version after a write made while Redis was unreachable): apply it
-- once, and only to a copy that does not already include it ('jv': newest Postgres version folded in).
if ARGV[7] ~= '' then
  if tonumber(redis.call('HGET', KEYS[1], 'jv') or '0') >= tonumber(ARGV[7]) then return -3 end
  redis.call('HSET', KEYS[1], 'jv', ARGV[7])
end
-- one HSET per pair: unpack() of thousands of arguments would overflow Lua's stack
for i = sets, unsets - 1, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for i = unsets, guards - 1 do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = attributes, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if ARGV[5] ~= '' then redis.call('HSET', KEYS[1], 'st', ARGV[5]) end
redis.call('HSET', KEYS[1], 'sz', size)
redis.call('HDEL', KEYS[1], 'k')  -- Postgres lacks this change: the next flush writes the whole row
local version = redis.call('HINCRBY', KEYS[1], 'v', 1)
if ARGV[4] == '1' then
  redis.call('ZADD', KEYS[2], 'NX', ARGV[1], ARGV[2])
  redis.call('PERSIST', KEYS[1])
end
return {version, size}
