-- dirty_of_user: one ZSCAN step over a partition's dirty index, filtered to one user's sessions: the part of
-- a per-user listing that Postgres may not hold yet (new sessions, a new owner). Everything else is in
-- Postgres, whose user_id index answers for it; Redis keeps no per-user index (it would cost a set entry,
-- or a whole key, per session). ZSCAN, not ranks: acks remove entries meanwhile, and a rank-based page
-- would then skip the entries that moved up.
-- KEYS: dirty index
-- ARGV: session key prefix (same hash tag), user_id, cursor ('0' to start), count
-- Returns {next cursor ('0' at the end), id...}
local step = redis.call('ZSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local out = {step[1]}
local entries = step[2]
for i = 1, #entries, 2 do  -- member, score pairs
  if redis.call('HGET', ARGV[1] .. entries[i], 'u') == ARGV[2] then out[#out + 1] = entries[i] end
end
return out
