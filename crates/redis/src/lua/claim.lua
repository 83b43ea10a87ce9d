-- Points a record Redis holds as the truth at its unique index values, as a
-- put through accept_write.lua does: an import, after copy_in (which carries
-- the record, not its claims). Preceded by claims.lua.
-- KEYS[1] record key   KEYS[2..] claim keys of its unique index values
-- ARGV[1] now (microseconds)   ARGV[2..] per claim key: index name, value
-- Returns {'ok'}, {'gone'} (the record is not live) or {'taken', index, value}.
local key, now = KEYS[1], ARGV[1]
local cur = redis.call('HMGET', key, 'd', 'x', 'k')
if not cur[1] or (cur[2] and tonumber(cur[2]) <= tonumber(now)) then
  return {'gone'}
end
local claims = {}
for i = 2, #KEYS do
  claims[#claims + 1] = KEYS[i]
  if claim_held_elsewhere(KEYS[i], key, now) then
    return {'taken', ARGV[2 * i - 2], ARGV[2 * i - 1]}
  end
end
retake_claims(key, cur[3], claims, cur[2] or '')
return {'ok'}
