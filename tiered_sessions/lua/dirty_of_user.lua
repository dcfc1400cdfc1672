-- dirty_of_user: one page of a partition's dirty index, filtered to one user's sessions: the part of a
-- per-user listing that Postgres may not hold yet (new sessions, a new owner). Everything else is in
-- Postgres, whose user_id index answers for it; Redis keeps no per-user index (it would cost a set entry,
-- or a whole key, per session).
-- KEYS: dirty index
-- ARGV: session key prefix (same hash tag), user_id, start, count
-- Returns {next start (-1 at the end), id...}
local start, count = tonumber(ARGV[3]), tonumber(ARGV[4])
local ids = redis.call('ZRANGE', KEYS[1], start, start + count - 1)
local out = {#ids < count and -1 or start + count}
for _, id in ipairs(ids) do
  if redis.call('HGET', ARGV[1] .. id, 'u') == ARGV[2] then out[#out + 1] = id end
end
return out
