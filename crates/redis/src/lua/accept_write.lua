-- A write the cache tier takes itself, ahead of the durable tier (journaled)
-- or as the only tier (redis_only): checks the precondition, assigns the next
-- version and updates the record, all in one atomic step. Journaled, it also
-- appends the journal entry and pins the copy (no expiry, field p) until the
-- entry has been replayed. Cache-only, it keeps the id in the shard's id set
-- (for listing) and marks the record authoritative (field a), so that cache
-- cleanup never removes it. KEYS[2] shares KEYS[1]'s hash tag either way.
--
-- Where Redis is the deployment's only tier, it enforces unique indexes
-- (claims.lua, which this script starts with): a put names the claim keys
-- of its indexed values; one that another live record holds refuses the
-- write, changing nothing. A put frees the claims the record no longer
-- takes, a delete all of them.
--
-- KEYS[1] record key
-- KEYS[2] journal stream (journaled) or id set (cache-only) of the shard
-- KEYS[3] pinned ids of the collection in the shard (journaled)
-- KEYS[4..] claim keys of the put's unique index values (cache-only)
-- ARGV[1] 'put' | 'delete'
-- ARGV[2] clock: the version to use if it is above the current one (20 digits)
-- ARGV[3] precondition: 'none' | 'match' | 'exists' | 'absent'
-- ARGV[4] expected version (20 digits) for 'match'
-- ARGV[5] data JSON (put)   ARGV[6] now (microseconds)   ARGV[7] expires or ''
-- ARGV[8] '1' when an unknown key may be written (journaled only; an unknown
--         key has no copy and no marker, so its state is not known here)
-- ARGV[9] collection   ARGV[10] id
-- ARGV[11] 'journal' | 'only'   ARGV[12] deletion marker time to live (ms)
-- ARGV[13..] per claim key: index name, value (for the refusal)
-- Returns {'ok', version, created ('1'/'0'), created_at}, {'unknown'},
-- {'conflict', current version or ''}, {'notfound'} or {'taken', index, value}.
local key, second = KEYS[1], KEYS[2]
local op, pre, now, expires = ARGV[1], ARGV[3], ARGV[6], ARGV[7]
local journaled = ARGV[11] == 'journal'
local cur = redis.call('HMGET', key, 'v', 'd', 'c', 'x', 'k')
local cur_v, cur_d, cur_c, cur_x, cur_k = cur[1], cur[2], cur[3], cur[4], cur[5]
-- Cache-only, the cache is the truth: no key means no record.
if journaled and not cur_v and ARGV[8] ~= '1' then
  return {'unknown'}
end
local live = cur_d and (not cur_x or tonumber(cur_x) > tonumber(now))
if (pre == 'match' and not (live and cur_v == ARGV[4]))
  or (pre == 'exists' and not live)
  or (pre == 'absent' and live) then
  return {'conflict', cur_v or ''}
end
if op == 'delete' and not live then
  return {'notfound'}
end

local claims = {}
for i = 4, #KEYS do
  claims[#claims + 1] = KEYS[i]
  if claim_held_elsewhere(KEYS[i], key, now) then
    return {'taken', ARGV[13 + 2 * (i - 4)], ARGV[14 + 2 * (i - 4)]}
  end
end

local next_version = tonumber(ARGV[2])
if cur_v and tonumber(cur_v) >= next_version then
  next_version = tonumber(cur_v) + 1
end
local version = string.format('%020d', next_version)

local created_at = now
if live then
  created_at = cur_c
end
redis.call('DEL', key)
if op == 'put' then
  redis.call('HSET', key, 'v', version, 'd', ARGV[5], 'c', created_at, 'u', now)
  if expires ~= '' then
    redis.call('HSET', key, 'x', expires)
  end
else
  redis.call('HSET', key, 'v', version, 'u', now)
end

if journaled then
  redis.call('HSET', key, 'p', version)
  redis.call('ZADD', KEYS[3], 0, ARGV[10])
  redis.call('XADD', second, '*', 'op', op, 'key', key, 'collection', ARGV[9], 'id', ARGV[10],
    'v', version, 'd', ARGV[5], 'c', created_at, 'u', now, 'x', expires)
elseif op == 'put' then
  redis.call('HSET', key, 'a', '1')
  redis.call('ZADD', second, 0, ARGV[10])
  if expires ~= '' then
    redis.call('PEXPIREAT', key, math.floor(tonumber(expires) / 1000))
  end
else
  redis.call('ZREM', second, ARGV[10])
  redis.call('PEXPIRE', key, ARGV[12])
end

if not journaled and (cur_k or #claims > 0) then
  local claims_until = ''
  if op == 'put' then
    claims_until = expires
  else
    claims = {}
  end
  retake_claims(key, cur_k, claims, claims_until)
end

local created = '0'
if (cur_v or not journaled) and not live then
  created = '1'
end
return {'ok', version, created, created_at}
