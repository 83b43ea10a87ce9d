-- Stores a state carried over from the durable tier by sync or repair: a copy
-- that expires, the truth of a cache-only collection, or a deletion marker.
-- Only over an older version unless forced, and never over a pinned copy (a
-- journal entry not yet replayed holds a version the durable tier lacks; its
-- replay decides). At the same version, an authoritative copy adopts a plain
-- one (marks it, keeps it in the id set), so a collection moved onto
-- redis_only keeps what was cached.
--
-- KEYS[1] record key   KEYS[2] id set of the shard (cache-only listing)
-- ARGV[1] version   ARGV[2] data JSON, '' for a deletion marker
-- ARGV[3] created   ARGV[4] updated   ARGV[5] expires or ''
-- ARGV[6] lifetime (ms) of a copy or marker
-- ARGV[7] '1' authoritative   ARGV[8] '1' force   ARGV[9] id
-- Returns 'written', 'kept' or 'pinned'.
local key = KEYS[1]
local cur = redis.call('HMGET', key, 'v', 'p', 'a')
local cur_v, pinned, authoritative = cur[1], cur[2], cur[3]
if pinned then
  return 'pinned'
end
local deletion = ARGV[2] == ''
local adopt = ARGV[7] == '1' and not deletion and cur_v == ARGV[1] and not authoritative
if cur_v and cur_v >= ARGV[1] and ARGV[8] ~= '1' and not adopt then
  return 'kept'
end
redis.call('DEL', key)
if deletion then
  redis.call('HSET', key, 'v', ARGV[1], 'u', ARGV[4])
  redis.call('PEXPIRE', key, ARGV[6])
  redis.call('ZREM', KEYS[2], ARGV[9])
  return 'written'
end
redis.call('HSET', key, 'v', ARGV[1], 'd', ARGV[2], 'c', ARGV[3], 'u', ARGV[4])
if ARGV[5] ~= '' then
  redis.call('HSET', key, 'x', ARGV[5])
end
if ARGV[7] == '1' then
  redis.call('HSET', key, 'a', '1')
  redis.call('ZADD', KEYS[2], 0, ARGV[9])
  if ARGV[5] ~= '' then
    redis.call('PEXPIREAT', key, math.floor(tonumber(ARGV[5]) / 1000))
  end
else
  redis.call('PEXPIRE', key, ARGV[6])
end
return 'written'
