-- Drops a copy still pinned at the given version (see CacheStore::drop_pinned):
-- its journal entry stays, and replays version-guarded.
-- KEYS[1] record key   KEYS[2] pinned ids of its collection and shard
-- ARGV[1] version   ARGV[2] id
if redis.call('HGET', KEYS[1], 'p') == ARGV[1] then
  redis.call('ZREM', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
