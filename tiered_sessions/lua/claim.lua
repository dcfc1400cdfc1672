-- claim: the oldest dirty sessions of one partition, each as the JSON row the flusher writes, as one
-- consistent snapshot. Building the rows here keeps the flusher's Python out of the per-field work: its
-- batch is these rows joined into one JSON array (see upsert_batch.sql for the keys).
-- KEYS: dirty index
-- ARGV: session key prefix (same hash tag as the dirty index), limit, max_score (dirty since at most this),
--       now_ms (a live session whose expiry has passed is written as 'expired')
-- Returns {id, version, kind, row} per entry, flat. kind: 'u' upsert, 't' tombstone, 'e' expired. An id
-- whose hash is gone comes with version false (nothing to write: the caller just clears its mark).
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

local out = {}
local n = 0
for _, id in ipairs(ids) do
  local flat = redis.call('HGETALL', ARGV[1] .. id)
  local f, data, meta = {}, {}, {}
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
  if not f.v then
    out[n + 1], out[n + 2], out[n + 3], out[n + 4] = id, false, false, false
  else
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
    out[n + 1], out[n + 2], out[n + 3] = id, f.v, kind
    out[n + 4] = '{"i":' .. encode(id) .. ',"v":' .. f.v .. ',"s":"' .. state .. '","d":' .. data_json ..
      ',"m":' .. meta_json .. ',"u":' .. text(f.u) .. ',"ut":' .. text(f.ut) .. ',"ip":' .. text(f.ip) ..
      ',"ua":' .. text(f.ua) .. ',"c":' .. f.c .. ',"la":' .. f.la .. ',"ex":' .. f.ex ..
      ',"rc":' .. (f.rc or '0') .. ',"td":' .. (f.td or '0') .. '}'
  end
  n = n + 4
end
return out
