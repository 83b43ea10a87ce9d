-- A write accepted by the cache tier ahead of the durable tier (write-behind):
-- checks the precondition, assigns the next version, updates the record copy
-- and appends the journal entry, all in one atomic step. The record key and
-- the journal stream share a hash tag, so this stays within one cluster slot.
-- The key is pinned (no expiry, field p) until the entry has been replayed.
--
-- KEYS[1] record key   KEYS[2] journal stream of the key's shard
-- ARGV[1] 'put' | 'delete'
-- ARGV[2] clock: the version to use if it is above the current one (20 digits)
-- ARGV[3] precondition: 'none' | 'match' | 'exists' | 'absent'
-- ARGV[4] expected version (20 digits) for 'match'
-- ARGV[5] data JSON (put)   ARGV[6] now (microseconds)   ARGV[7] expires or ''
-- ARGV[8] '1' when an unknown key may be written (its state is unknown:
--         no copy and no marker); '0' asks the caller to load it first
-- ARGV[9] collection   ARGV[10] id
-- Returns {'ok', version, created ('1'/'0'), created_at}, {'unknown'},
-- {'conflict', current version or ''} or {'notfound'}.
local key, journal = KEYS[1], KEYS[2]
local op, pre, now, expires = ARGV[1], ARGV[3], ARGV[6], ARGV[7]
local cur = redis.call('HMGET', key, 'v', 'd', 'c', 'x')
local cur_v, cur_d, cur_c, cur_x = cur[1], cur[2], cur[3], cur[4]
if not cur_v and ARGV[8] ~= '1' then
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
  redis.call('HSET', key, 'v', version, 'd', ARGV[5], 'c', created_at, 'u', now, 'p', version)
  if expires ~= '' then
    redis.call('HSET', key, 'x', expires)
  end
else
  redis.call('HSET', key, 'v', version, 'u', now, 'p', version)
end
redis.call('XADD', journal, '*', 'op', op, 'key', key, 'collection', ARGV[9], 'id', ARGV[10],
  'v', version, 'd', ARGV[5], 'c', created_at, 'u', now, 'x', expires)
local created = '0'
if cur_v and not live then
  created = '1'
end
return {'ok', version, created, created_at}
