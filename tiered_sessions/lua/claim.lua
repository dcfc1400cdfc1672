-- claim: the oldest dirty sessions of one partition, each as the JSON row the flusher writes, as one
-- consistent snapshot. Building the rows here keeps the flusher's Python out of the per-field work: its
-- batch is these rows joined into one JSON array (see upsert_batch.sql and activity_batch.sql for the keys).
-- KEYS: dirty index
-- ARGV: session key prefix (same hash tag as the dirty index), limit, max_score (dirty since at most this),
--       now_ms (a live session whose expiry has passed is written as 'expired'), quarantine key prefix (same
--       hash tag)
-- Returns {id, version, kind, row} per entry, flat. kind: 'u' upsert, 't' tombstone, 'e' expired, 'a'
-- activity: only version, times and counters, for a live session whose data, attributes and state Postgres
-- holds already ('k' = '1': set by the ack of a full write, removed by every write other than a touch). An
-- id whose hash is gone comes with version false (nothing to write: the caller just clears its mark). A key
-- that is not a session hash (another type planted or left there) would fail every claim of the partition:
-- it is renamed to the quarantine prefix, leaves the dirty index, and comes back as kind 'p' with the error
-- and the new key name as its row.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[3], 'LIMIT', 0, tonumber(ARGV[2]))
local now = tonumber(ARGV[4])
local encode = cjson.encode
local sub = string.sub
local concat = table.concat
local state_names = {a = 'active', c = 'closed'}

local function text(value)
  if value then return encode(value) end
  return 'null'
end

-- Under touch-only traffic most rows are these: seven fields instead of the whole hash.
local function activity_row(id, key)
  if redis.call('HGET', key, 'k') ~= '1' then return false end  -- one field: cheap for the full rows
  local f = redis.call('HMGET', key, 'st', 'ex', 'v', 'la', 'rc', 'td')
  if f[1] ~= 'a' or tonumber(f[2]) <= now then return false end
  return f[3], 'a', '{"i":' .. encode(id) .. ',"v":' .. f[3] .. ',"la":' .. f[4] .. ',"ex":' .. f[2] ..
    ',"rc":' .. (f[5] or '0') .. ',"td":' .. (f[6] or '0') .. '}'
end

local function full_row(id, key)
  local flat = redis.call('HGETALL', key)
  -- Every fixed field present from the start: the table is sized once, not grown field by field
  local f = {v = false, st = false, c = false, la = false, ex = false, rc = false, td = false, u = false,
             ut = false, ip = false, ua = false, sz = false, k = false, jv = false}
  local data, meta = {}, {}
  for i = 1, #flat, 2 do
    local field, value = flat[i], flat[i + 1]
    local prefix = sub(field, 1, 2)
    -- d:<key> and m:<key> hold each top-level value's JSON already: concatenated, not re-encoded
    if prefix == 'd:' then
      data[#data + 1] = encode(sub(field, 3)) .. ':' .. value
    elseif prefix == 'm:' then
      meta[#meta + 1] = encode(sub(field, 3)) .. ':' .. value
    else
      f[field] = value
    end
  end
  if not f.v then return false, false, false end
  local kind, state, data_json, meta_json
  if f.st == 'x' then
    kind, state, data_json, meta_json = 't', 'removed', '{}', '{}'
  else
    data_json, meta_json = '{' .. concat(data, ',') .. '}', '{' .. concat(meta, ',') .. '}'
    if tonumber(f.ex) <= now then
      kind, state = 'e', 'expired'
    else
      kind, state = 'u', state_names[f.st or 'a'] or 'active'
    end
  end
  return f.v, kind, '{"i":' .. encode(id) .. ',"v":' .. f.v .. ',"s":"' .. state .. '","d":' .. data_json ..
    ',"m":' .. meta_json .. ',"u":' .. text(f.u) .. ',"ut":' .. text(f.ut) .. ',"ip":' .. text(f.ip) ..
    ',"ua":' .. text(f.ua) .. ',"c":' .. f.c .. ',"la":' .. f.la .. ',"ex":' .. f.ex ..
    ',"rc":' .. (f.rc or '0') .. ',"td":' .. (f.td or '0') .. '}'
end

-- Looking for activity rows costs one HGET per row; a backlog of new sessions has none. After 8 misses in a
-- row, look at one row in 16 only, until a row is one again.
local probing, misses, skipped = true, 0, 0
local out = {}
local n = 0
local function entry(id, key)
  local version, kind, row = false, false, false
  if probing or skipped >= 15 then
    skipped = 0
    version, kind, row = activity_row(id, key)
    if version then
      probing, misses = true, 0
    else
      misses = misses + 1
      probing = misses < 8
    end
  else
    skipped = skipped + 1
  end
  if not version then version, kind, row = full_row(id, key) end
  return version, kind, row
end

for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local ok, version, kind, row = pcall(entry, id, key)
  if not ok then
    local message = type(version) == 'table' and version.err or tostring(version)
    if not string.find(message, 'WRONGTYPE', 1, true) then error(version) end
    local moved = ARGV[5] .. id
    redis.call('RENAME', key, moved)
    redis.call('ZREM', KEYS[1], id)
    version, kind, row = false, 'p', message .. ' (moved to ' .. moved .. ')'
  end
  out[n + 1], out[n + 2], out[n + 3], out[n + 4] = id, version, kind, row
  n = n + 4
end
return out
