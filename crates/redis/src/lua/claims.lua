-- Unique index claims where Redis is the deployment's only tier (cache-only):
-- functions that accept_write.lua and claim.lua start with. A claim key (the
-- lookup key of one index value) holds the record key of its owner, and the
-- owner lists its claims in field k: a claim counts only while its owner is
-- live and still lists it, so an owner that expired or moved on frees it.
-- (Claims and owners are in other slots than the record: standalone Redis,
-- as SPEC section 1 says.)

-- Whether `claim` is held by a live record other than `key` at `now` (µs).
local function claim_held_elsewhere(claim, key, now)
  local owner = redis.call('GET', claim)
  if not owner or owner == key then
    return false
  end
  local o = redis.call('HMGET', owner, 'd', 'x', 'k')
  if not o[1] or (o[2] and tonumber(o[2]) <= tonumber(now)) or not o[3] then
    return false
  end
  return string.find('\n' .. o[3] .. '\n', '\n' .. claim .. '\n', 1, true) ~= nil
end

-- Frees the claims `key` held (`held`: field k, or nil) that are not among
-- `claims`, and takes `claims` until `expires` (µs, or '' for never).
local function retake_claims(key, held, claims, expires)
  local taking = {}
  for _, claim in ipairs(claims) do
    taking[claim] = true
  end
  if held then
    for claim in string.gmatch(held, '[^\n]+') do
      if not taking[claim] and redis.call('GET', claim) == key then
        redis.call('DEL', claim)
      end
    end
  end
  if #claims == 0 then
    redis.call('HDEL', key, 'k')
    return
  end
  for _, claim in ipairs(claims) do
    redis.call('SET', claim, key)
    if expires ~= '' then
      redis.call('PEXPIREAT', claim, math.floor(tonumber(expires) / 1000))
    end
  end
  redis.call('HSET', key, 'k', table.concat(claims, '\n'))
end
