-- Adds one increment to every bucket of its scope and journals it, in one
-- atomic step; or, if a bucket is not held (never seeded, or lost), changes
-- nothing and says which, so the engine can seed it first.
--
-- Values are exact: whole units in `u:<field>` and the nano remainder,
-- always in [0, 10^9), in `n:<field>`; both are integers for HINCRBY, and
-- the remainder carries into the units. Units arrive as decimal strings and
-- only ever meet HINCRBY, so no Lua double touches a large value.
--
-- A total is kept within +-10^18 (MAX_TOTAL_UNITS), so what was accepted
-- reads back, exports and restores in every tier: an increment that would
-- take one past it is undone and answered {'range', field}. The check reads
-- the exact decimal text; a Lua double would round near 10^18.
--
-- An increment applied before (its id marked, e.g. a client retry with the
-- same Idempotency-Key) is not applied again: {'dup'}.
--
-- KEYS[1..B] bucket hashes   KEYS[B+1] the scope's counter journal stream
-- KEYS[B+2] the increment id's marker (same shard)
-- ARGV[1] B   ARGV[2] journal payload (JSON), or '' when Redis holds the
--         counters' truth (nothing is journaled)   ARGV[3] F (number of fields)
-- ARGV[4 .. 3+3F] per field: name, units, nanos
-- ARGV[4+3F .. 3+3F+B] per bucket: expiry (ms since the epoch) or ''
-- ARGV[4+3F+B] lifetime of the id marker (ms)
-- Returns {'dup'}, {'range', field}, {'cold', i...} (1-based bucket indexes) or
-- {'ok', per bucket: complete flag, then per field: units, nanos}.
local buckets = tonumber(ARGV[1])
local fields = tonumber(ARGV[3])
local cold = {}
for i = 1, buckets do
  if redis.call('EXISTS', KEYS[i]) == 0 then
    cold[#cold + 1] = i
  end
end
if #cold > 0 then
  return {'cold', unpack(cold)}
end
if not redis.call('SET', KEYS[buckets + 2], '1', 'NX', 'PX', ARGV[4 + 3 * fields + buckets]) then
  return {'dup'}
end
local function out_of_range(units, nanos)
  if #units < 19 or (#units == 19 and units:sub(1, 1) == '-') then
    return false
  end
  if units == '1000000000000000000' then
    return nanos ~= '0'
  end
  return units ~= '-1000000000000000000'
end
local before = {}
local out = {'ok'}
local refused = nil
for i = 1, buckets do
  local key = KEYS[i]
  out[#out + 1] = redis.call('HGET', key, '_s') or '0'
  for j = 0, fields - 1 do
    local name = ARGV[4 + 3 * j]
    before[#before + 1] = {key, name, redis.call('HGET', key, 'u:' .. name), redis.call('HGET', key, 'n:' .. name)}
    local remainder = redis.call('HINCRBY', key, 'n:' .. name, ARGV[6 + 3 * j])
    if remainder >= 1000000000 then
      redis.call('HINCRBY', key, 'n:' .. name, -1000000000)
      redis.call('HINCRBY', key, 'u:' .. name, 1)
    end
    redis.call('HINCRBY', key, 'u:' .. name, ARGV[5 + 3 * j])
    local units = redis.call('HGET', key, 'u:' .. name)
    local nanos = redis.call('HGET', key, 'n:' .. name)
    if refused == nil and out_of_range(units, nanos) then
      refused = name
    end
    out[#out + 1] = units
    out[#out + 1] = nanos
  end
end
if refused ~= nil then
  for _, held in ipairs(before) do
    local key, name = held[1], held[2]
    if held[3] then redis.call('HSET', key, 'u:' .. name, held[3]) else redis.call('HDEL', key, 'u:' .. name) end
    if held[4] then redis.call('HSET', key, 'n:' .. name, held[4]) else redis.call('HDEL', key, 'n:' .. name) end
  end
  redis.call('DEL', KEYS[buckets + 2])
  return {'range', refused}
end
for i = 1, buckets do
  local expiry = ARGV[3 + 3 * fields + i]
  if expiry ~= '' then
    redis.call('PEXPIREAT', KEYS[i], expiry)
  end
end
if ARGV[2] ~= '' then
  redis.call('XADD', KEYS[buckets + 1], '*', 'p', ARGV[2])
end
return out
