-- claim: the oldest dirty sessions of one partition with their hashes, as one consistent snapshot.
-- KEYS: dirty index
-- ARGV: session key prefix (same hash tag as the dirty index), limit, max_score (dirty since at most this)
-- Returns {id, hash...} pairs: ids whose hash is gone come with an empty hash
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i, id in ipairs(ids) do
  out[2 * i - 1] = id
  out[2 * i] = redis.call('HGETALL', ARGV[1] .. id)
end
return out
