-- Removes a copy (a pinned one too, but never the truth of a cache-only
-- collection) older than a version the durable tier has committed: only
-- ever removes, so it cannot race a newer copy into staleness.
-- KEYS[1] record key   KEYS[2] pinned ids of its collection and shard
-- ARGV[1] committed version   ARGV[2] id
local cur = redis.call('HMGET', KEYS[1], 'v', 'a')
if cur[1] and cur[1] < ARGV[1] and not cur[2] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
